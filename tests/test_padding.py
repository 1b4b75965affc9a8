"""A reference that never depends on its batch mates (`sparsepo.padding`): for rope types whose
frequencies follow the padded batch length (Phi-3 `longrope`, `dynamic` NTK), every role pads every
batch to data.max_length, so cache, inline and live give the policy's own log-probs.

    PYTHONPATH=$PWD python -m pytest -q tests/test_padding.py -k "not slow"
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import read_scalars, run_training
from sparsepo.data import collate_pairs
from sparsepo.padding import batch_length, fixed_length, padding_dependence

ORIGINAL = 32  # the demo pairs are 15-40 tokens and data.max_length is 96: batches cross it, and not all of them
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def rope_config(case: str, vocab: int = 100):
    import transformers as T

    if case == "phi3-longrope":
        return T.Phi3Config(**COMMON, vocab_size=vocab, max_position_embeddings=4 * ORIGINAL,
                            original_max_position_embeddings=ORIGINAL,
                            rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                             "long_factor": [4.0] * 4, "rope_theta": 10000.0})
    if case == "llama-dynamic":
        return T.LlamaConfig(**COMMON, vocab_size=vocab, max_position_embeddings=ORIGINAL,
                             rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    kinds = {"llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": ORIGINAL},
             "linear": {"rope_type": "linear", "factor": 2.0}, "default": {"rope_type": "default"}}
    return T.LlamaConfig(**COMMON, vocab_size=vocab, max_position_embeddings=4 * ORIGINAL,
                         rope_parameters={**kinds[case.split("-")[1]], "rope_theta": 10000.0})


@pytest.mark.parametrize("case,limit", [("phi3-longrope", ORIGINAL), ("llama-dynamic", ORIGINAL)])
def test_padding_dependent_rope_types_are_found_from_the_config(case, limit):
    why, threshold = padding_dependence(rope_config(case))
    assert threshold == limit and str(limit) in why
    assert fixed_length((why, threshold), 96) == 96 and fixed_length((why, threshold), limit) is None


@pytest.mark.parametrize("case", ["llama-llama3", "llama-linear", "llama-default"])
def test_rope_types_that_ignore_padding_are_left_alone(case):
    assert padding_dependence(rope_config(case)) is None


def test_per_layer_type_rope_parameters_are_read_too():
    from types import SimpleNamespace

    config = SimpleNamespace(max_position_embeddings=64, rope_parameters={
        "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "dynamic", "factor": 2.0}})
    assert padding_dependence(config)[1] == 64


def rows(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [{"example_id": f"r{i}", "prompt_ids": torch.randint(3, 100, (4,), generator=g).tolist(),
             "chosen_ids": torch.randint(3, 100, (n - 4,), generator=g).tolist(),
             "rejected_ids": torch.randint(3, 100, (n - 5,), generator=g).tolist()} for i, n in enumerate(lengths)]


def test_a_fixed_length_pads_every_batch_to_it_and_refuses_longer_rows():
    batch = collate_pairs(rows([10, 12]), 0, length=40)
    assert batch.input_ids.shape == (4, 40) and batch.attention_mask.sum().item() == 10 + 12 + 9 + 11
    with pytest.raises(ValueError, match="r1: 41 tokens, longer than the fixed batch length 40"):
        collate_pairs(rows([10, 41]), 0, length=40)


@pytest.mark.parametrize("case", ["phi3-longrope", "llama-dynamic"])
def test_a_rows_log_probs_no_longer_depend_on_its_batch_mates(case):
    """Row r0 (16 tokens) alone, then beside a 60-token row (the batch crosses the threshold): with
    the fixed length (batch_length's choice) its log-probs are identical, in either order of batches
    (dynamic keeps the longest length seen); padded to the longest row they differ."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(rope_config(case)).eval()
    alone, mates = rows([16]), rows([16, 60])
    mates[0] = alone[0]
    length = fixed_length(padding_dependence(model.config), 64)

    def row0(batch_rows, length):
        batch = collate_pairs(batch_rows, 0, length=length)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[0, :16].log_softmax(-1)

    fixed = [row0(alone, length), row0(mates, length), row0(alone, length)]
    assert torch.equal(fixed[0], fixed[1]) and torch.equal(fixed[1], fixed[2])
    assert (row0(alone, None) - row0(mates, None)).abs().max() > 1e-4


def save_model(case: str, tokenizer, directory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(rope_config(case, len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def ours(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "sparsepo")


def test_the_run_pads_to_max_length_and_keys_the_cache_on_it(tiny_world, tmp_path, caplog):
    """batch_length reads the configs of the policy and of the reference (either may be the one);
    it warns on every padding-dependent model, and the cache key changes with the length."""
    from transformers import AutoTokenizer

    from sparsepo.config import load_config
    from sparsepo.reference_role.offline import cache_settings

    tok = AutoTokenizer.from_pretrained(tiny_world.sft_dir)
    phi = save_model("phi3-longrope", tok, tmp_path / "phi")
    plain = f"model.path={tiny_world.sft_dir}"
    data = (f"data.path={tiny_world.train_path}", "data.max_prompt_length=16")
    cfg = lambda *o: load_config(None, [*data, *o])  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="sparsepo"):
        assert batch_length(cfg(plain), announce=True) is None and not ours(caplog)
        assert batch_length(cfg(plain, f"reference.path={phi}", "data.max_length=96"), announce=True) == 96
        assert "longrope" in ours(caplog) and "data.max_length=96" in ours(caplog)
        caplog.clear()
        assert batch_length(cfg(f"model.path={phi}", "data.max_length=32"), announce=True) is None
        assert "does not change the numbers" in ours(caplog)  # warned even when no batch can cross it
    keys = [cache_settings(cfg(f"model.path={phi}", f"data.max_length={n}"), ("seq_logps",)) for n in (64, 96)]
    assert keys[0]["batch_length"] == 64 and keys[1]["batch_length"] == 96
    assert "batch_length" not in cache_settings(cfg(plain), ("seq_logps",))


# step 1 = 4 pairs scored alone (lengths 32, 40, 39, 40 in the tiny world's order); the cache pads by 8 in row order
STEP1 = ("train.max_steps=1", "train.micro_batch_size=1", "train.grad_accum=4", "method.name=dpo",
         "reference.batch_size=8", "optim.warmup_steps=0")
MODES = {"cache": (), "inline": ("reference.mode=inline",),
         "live": ("reference.mode=live", "topology.reference_ranks=2", "topology.pipeline_stages=2")}


def _mode(mode: str):
    if mode == "cache":  # the mode that was wrong: the only coverage of the fix in the default run
        return pytest.param(mode, id=mode)
    return pytest.param(mode, id=mode, marks=[pytest.mark.slow] + ([pytest.mark.distributed] if mode == "live" else []))


@pytest.mark.parametrize("mode", [_mode(m) for m in MODES])
@pytest.mark.parametrize("case", ["phi3-longrope", "llama-dynamic"])
def test_step_one_is_ln2_in_every_mode(case, mode, tiny_world, tmp_path):
    """The policy is the reference at step 1, so DPO's loss is exactly ln 2 and no pair is 'won'
    (accuracy 0) — unless the reference scored a row with other batch mates than the policy's
    (before: cache mode gave 0.6930443 for longrope, 0.6931505 for dynamic)."""
    from transformers import AutoTokenizer

    model_dir = save_model(case, AutoTokenizer.from_pretrained(tiny_world.sft_dir), tmp_path / "model")
    run_training(tiny_world, tmp_path / mode, f"model.path={model_dir}", *STEP1, *MODES[mode],
                 nproc=3 if mode == "live" else 1)
    loss, accuracy = read_scalars(tmp_path / mode, "train/loss"), read_scalars(tmp_path / mode, "train/accuracy")
    assert loss[1] == pytest.approx(math.log(2), abs=1e-7) and accuracy[1] == 0.0, (case, mode, loss, accuracy)
