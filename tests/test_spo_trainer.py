"""SPO in the trainer (inline reference): the sample fields against a dense computation, and end to
end on the tiny demo world (1 rank, and 2 ranks = 1 rank for the same global batch)."""

import pytest
import torch

from conftest import read_scalars, run_training
from sparsepo.data.batching import collate_pairs
from sparsepo.config.generation import GenerationConfig
from sparsepo.losses.kl import topk_tail_kl
from sparsepo.logprobs.head import Head
from sparsepo.logprobs.lean import HeadInput
from sparsepo.policy_samples import PolicySamples
from sparsepo.reference_role.sources import InlineSource
from test_pipeline_reference import VOCAB, tiny_llama

STEPS = 4
SPO = ("method.name=spo", "reference.mode=inline", "generation.max_new_tokens=8", "optim.lr=1e-2",
       "optim.schedule=constant", "optim.warmup_steps=0")


class PlainPolicy:
    """A Hugging Face model with PolicyEngine's generate/forward signature (no DeepSpeed)."""

    def __init__(self, model):
        self.model = self.module = model  # `module`: where the lean path finds the HF model, as in PolicyEngine

    def __call__(self, **kw):
        return self.model(**kw)

    def generate(self, input_ids, attention_mask, *, max_new_tokens, processor, pad_token_id, eos_token_id, params):
        from transformers import GenerationConfig as HFGen, LogitsProcessorList

        cfg = HFGen(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        with torch.no_grad():
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg,
                                       logits_processor=LogitsProcessorList([processor])), "local"


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("support", ["policy", "union"])
def test_sample_fields_give_the_dense_kl_when_k_is_the_vocabulary(support, chunk):
    """Policy and reference are two different random tiny Llamas. With K = V the tail-bin KL on the
    fields equals Σ_v πθ(v)(log πθ(v) − log πref(v)) from the two models' full logits, at every
    generated position; token fields are the two models' log-probs of the sampled tokens. On the plain
    path (chunk 0) and the lean one (model.logits_chunk > 0, both sides), with the same entropy metric."""
    policy, reference = tiny_llama(seed=0).requires_grad_(True), tiny_llama(seed=1)
    rows = [dict(example_id=f"e{i}", prompt_ids=list(range(3, 6 + i)), chosen_ids=[7, 2], rejected_ids=[8, 2])
            for i in range(3)]
    batch = collate_pairs(rows, 0)
    source = InlineSource(Head.for_model(reference, chunk), (), topk=VOCAB)
    plain_policy = PlainPolicy(policy)
    ps = PolicySamples(GenerationConfig(max_new_tokens=6, samples_per_prompt=2), source=source, topk=VOCAB,
                       support=support, seed=0, pad_id=0, eos_id=2, head=Head.for_model(plain_policy, chunk))
    fields, metrics = ps.fields(plain_policy, batch, step=0, micro=0)
    samples = ps.rounds[0]
    assert isinstance(ps._forward(plain_policy, samples), HeadInput) == (chunk > 0)  # which path ran
    mask = fields["sample_mask"]
    assert mask.shape[0] == 6 and metrics["samples_fresh"] == 1.0 and (mask.sum(-1) >= 1).all()
    with torch.no_grad():
        p = policy(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits.float().log_softmax(-1)
        q = reference(input_ids=samples.input_ids, attention_mask=samples.attention_mask).logits.float().log_softmax(-1)
    dense = (p.exp() * (p - q)).sum(-1)[:, :-1]  # position t is predicted by logits[t-1]
    entropy = -(p.exp() * p).sum(-1)[:, :-1]
    assert metrics["sample_entropy"] == pytest.approx(float((entropy * mask[:, 1:]).sum() / mask.sum()), abs=1e-5)
    got = topk_tail_kl(fields["policy_sample_topk_logps"], fields["ref_sample_topk_logps"])[:, 1:]
    on = mask[:, 1:].bool()
    assert torch.allclose(got[on], dense[on], atol=2e-5), (got[on] - dense[on]).abs().max()
    assert (got[~on] == 0).all()
    sampled = samples.input_ids[:, 1:, None]
    assert torch.allclose(fields["policy_sample_token_logps"][:, 1:][on], p[:, :-1].gather(-1, sampled)[..., 0][on], atol=1e-5)
    assert torch.allclose(fields["ref_sample_token_logps"][:, 1:][on], q[:, :-1].gather(-1, sampled)[..., 0][on], atol=1e-5)
    fields["policy_sample_topk_logps"].sum().backward()  # the policy side carries gradient
    assert any(w.grad is not None and w.grad.abs().sum() > 0 for w in policy.parameters())


@pytest.fixture(scope="module")
def spo_one_rank(tiny_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("spo1")
    run_training(tiny_world, run, *SPO, "train.micro_batch_size=4", f"train.max_steps={STEPS}",
                 "generation.every_steps=2")
    return run


@pytest.mark.integration
def test_spo_inline_trains_and_logs_its_terms(spo_one_rank):
    scalars = {t: read_scalars(spo_one_rank, f"train/{t}") for t in
               ("loss", "preference_loss", "kl_term", "sample_kl", "sample_length", "sample_entropy", "gen_time",
                "samples_fresh")}
    for tag, values in scalars.items():
        assert sorted(values) == list(range(1, STEPS + 1)), tag
    kl = scalars["sample_kl"]
    assert abs(kl[1]) < 1e-6  # step 1: the policy is the reference (both start from model.path)
    assert kl[STEPS] > 1e-3  # lr 1e-2 moved the policy away from it
    for step in kl:
        assert scalars["loss"][step] == pytest.approx(scalars["preference_loss"][step] + scalars["kl_term"][step],
                                                      rel=1e-5, abs=1e-6)
        assert scalars["kl_term"][step] == pytest.approx(0.1 * kl[step], rel=1e-5, abs=1e-9)
        assert 1 <= scalars["sample_length"][step] <= 8
    assert scalars["samples_fresh"] == {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0}  # generation.every_steps=2
    assert scalars["gen_time"][2] == 0.0 < scalars["gen_time"][1]


@pytest.mark.distributed
def test_spo_two_ranks_match_one_rank(tiny_world, spo_one_rank, tmp_path):
    """Keyed sampling: rank r draws the same samples for its prompts as the one-rank run does."""
    run_training(tiny_world, tmp_path, *SPO, "train.micro_batch_size=2", f"train.max_steps={STEPS}",
                 "generation.every_steps=2", nproc=2)
    for tag in ("loss", "sample_kl", "sample_length"):
        one, two = read_scalars(spo_one_rank, f"train/{tag}"), read_scalars(tmp_path, f"train/{tag}")
        assert sorted(two) == list(range(1, STEPS + 1))
        for step in one:
            assert one[step] == pytest.approx(two[step], rel=1e-4, abs=1e-5), (tag, step, one, two)


@pytest.mark.unit
def test_prompt_slots_are_disjoint_and_the_same_walk_on_any_rank_count():
    from sparsepo.data.prompts import prompts_for

    prompts = [(f"p{i}", [i]) for i in range(10)]
    two = [prompts_for(prompts, step=3, micro=0, rank=r, dp=2, grad_accum=1, per_slot=2) for r in range(2)]
    one = prompts_for(prompts, step=3, micro=0, rank=0, dp=1, grad_accum=1, per_slot=4)
    assert two[0] + two[1] == one == [prompts[i % 10] for i in range(12, 16)]


@pytest.mark.integration
def test_prompt_file_is_validated_and_trains(tiny_world, tmp_path):
    from sparsepo.config import load_config
    from sparsepo.data import DataError
    from sparsepo.data.prompts import load_prompts
    from sparsepo.models import load_tokenizer

    tok = load_tokenizer(str(tiny_world.sft_dir))
    good = [{"prompt": f"Review {i}: the film was"} for i in range(6)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in [good[0], {"prompt": "  "}, *good[1:]]) + "\n")
    cfg = load_config(None, ["method.name=spo", "reference.mode=inline", f"generation.prompts_path={path}"])
    with pytest.raises(DataError, match=r"prompts.jsonl: line 2: field 'prompt': only whitespace.*on_bad_row=skip"):
        load_prompts(str(path), cfg.data, tok)
    cfg.data.on_bad_row, cfg.data.max_skip_fraction = "skip", 0.5
    loaded = load_prompts(str(path), cfg.data, tok)
    assert len(loaded) == 6 and loaded[0][1] == tok(good[0]["prompt"])["input_ids"]
    cfg.data.max_prompt_length = 3
    assert all(len(ids) <= 3 for _, ids in load_prompts(str(path), cfg.data, tok))
    (tmp_path / "good.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in good) + "\n")
    proc = run_training(tiny_world, tmp_path / "run", *SPO, "train.micro_batch_size=2", "train.max_steps=2",
                        f"generation.prompts_path={tmp_path / 'good.jsonl'}")
    assert "6 prompts for SPO's samples" in proc.stderr + proc.stdout
    assert sorted(read_scalars(tmp_path / "run", "train/sample_kl")) == [1, 2]
