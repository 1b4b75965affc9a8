"""A short two-rank training run with a held-out split: TRL's metric names in TensorBoard, the resolved config
as text and hparams, and eval metrics that equal DPO applied by hand to the held-out pairs with the
final model (cache mode: the eval pairs' reference log-probs come from their own cache)."""

import json
import math

import pytest

from conftest import read_scalars, run_training

STEPS = 3


@pytest.fixture(scope="module")
def eval_run(tiny_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun")
    # two ranks, 6 eval pairs per rank per round: 16 held-out pairs leave rank 1's second round empty
    # (it scores a pad pair at weight 0); the by-hand check below is one process, unpadded
    run_training(tiny_world, run, "method.name=dpo", "method.beta=0.5", "train.micro_batch_size=2",
                 f"train.max_steps={STEPS}", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
                 "model.logits_chunk=0", "eval.fraction=0.25", "eval.every_steps=2", "eval.batch_size=6", nproc=2)
    return run


def test_train_scalars_carry_trls_names_every_step(eval_run):
    for name in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm",
                 "learning_rate", "epoch", "num_tokens", "accuracy", "margin"]:
        assert sorted(read_scalars(eval_run, f"train/{name}")) == list(range(1, STEPS + 1)), name
    tokens = read_scalars(eval_run, "train/num_tokens")
    assert 0 < tokens[1] < tokens[2] < tokens[3]
    assert read_scalars(eval_run, "train/epoch")[3] == pytest.approx(3 * 4 / 48)  # 48 training pairs
    assert read_scalars(eval_run, "train/learning_rate")[2] == pytest.approx(1e-3)


def test_config_is_written_as_text_and_hparams(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (eval_run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "beta: 0.5" in text and "fraction: 0.25" in text
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")


def held_out_pairs(run):
    from sparsepo import data as pdata
    from sparsepo.config import load_config
    from sparsepo.models import load_tokenizer

    cfg = load_config(run / "config.yaml")
    ds, _ = pdata.load_preference_dataset(cfg.data, load_tokenizer(cfg.model.path))
    return pdata.holdout_split(ds, cfg.eval.fraction, cfg.train.seed)[1], cfg


def test_eval_at_every_steps_and_the_end_equals_dpo_by_hand_on_the_held_out_pairs(eval_run, tiny_world):
    import torch
    from transformers import AutoModelForCausalLM

    assert sorted(read_scalars(eval_run, "eval/loss")) == [2, 3]
    held, cfg = held_out_pairs(eval_run)
    assert len(held) == 16
    policy, ref = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (eval_run / "final", tiny_world.sft_dir))

    def logp(model, prompt, response):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(lp[len(prompt) - 1:].sum())

    losses, acc, chosen = [], [], []
    for row in held:
        p = row["prompt_ids"]
        rw = 0.5 * (logp(policy, p, row["chosen_ids"]) - logp(ref, p, row["chosen_ids"]))
        rl = 0.5 * (logp(policy, p, row["rejected_ids"]) - logp(ref, p, row["rejected_ids"]))
        losses.append(math.log1p(math.exp(rl - rw)))
        acc.append(float(rw > rl))
        chosen.append(logp(policy, p, row["chosen_ids"]))
    final = json.loads((eval_run / "summary.json").read_text())["eval"]
    assert read_scalars(eval_run, "eval/loss")[3] == pytest.approx(sum(losses) / 16, abs=1e-5)
    assert final["loss"] == pytest.approx(sum(losses) / 16, abs=1e-5)
    assert final["rewards/accuracies"] == pytest.approx(sum(acc) / 16)
    assert final["logps/chosen"] == pytest.approx(sum(chosen) / 16, abs=1e-3)
    assert read_scalars(eval_run, "eval/loss")[2] != pytest.approx(final["loss"], abs=1e-7)  # the model moved
    # TRL's token statistics, pooled over every held-out response token (the pad pair of rank 1 excluded)
    ent, hits, logit_sums, counts = 0.0, 0, [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for row in held:
            p = row["prompt_ids"]
            for side, key in enumerate(("chosen_ids", "rejected_ids")):
                ids = torch.tensor([p + row[key]])
                logits = policy(input_ids=ids).logits[0, len(p) - 1:-1].float()  # the response's predictors
                logp = logits.log_softmax(-1)
                ent -= float((logp.exp() * logp).sum())
                logit_sums[side] += float(logits.mean(-1).sum())
                counts[side] += len(row[key])
                if side == 0:
                    hits += int((logits.argmax(-1) == ids[0, len(p):]).sum())
    assert final["entropy"] == pytest.approx(ent / sum(counts), abs=1e-4)
    assert final["mean_token_accuracy"] == pytest.approx(hits / counts[0])
    assert final["logits/chosen"] == pytest.approx(logit_sums[0] / counts[0], abs=1e-4)
    assert final["logits/rejected"] == pytest.approx(logit_sums[1] / counts[1], abs=1e-4)


@pytest.mark.distributed
def test_live_mode_eval_equals_cache_mode_eval(eval_run, tiny_world, tmp_path):
    """The same run with a live reference group (2 policy ranks + 1 reference rank): the group scores
    the held-out pairs into the eval cache before the first step, and every eval metric equals the
    cache-mode run's; the training curve too (eval.fraction splits the group's data alike)."""
    run = tmp_path / "live"
    run_training(tiny_world, run, "method.name=dpo", "method.beta=0.5", "train.micro_batch_size=2",
                 f"train.max_steps={STEPS}", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
                 "model.logits_chunk=0", "eval.fraction=0.25", "eval.every_steps=2", "eval.batch_size=6",
                 "reference.mode=live", "topology.reference_ranks=1", nproc=3)
    assert (run / "ref_cache_eval" / "index.json").is_file()
    for tag in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen", "train/loss"):
        want, got = read_scalars(eval_run, tag), read_scalars(run, tag)
        assert sorted(got) == sorted(want), tag
        assert all(got[s] == pytest.approx(want[s], abs=1e-5) for s in want), (tag, got, want)
