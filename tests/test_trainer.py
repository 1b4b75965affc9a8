"""End to end on the tiny demo world, through the real `deepspeed` launcher (CPU, gloo).

These launch real processes (a few seconds each after DeepSpeed's one-off op build)."""

import json

import math

import pytest

from conftest import read_scalars, run_training

pytestmark = pytest.mark.distributed
STEPS = 6


@pytest.fixture(scope="module")
def dpo_two_ranks(tiny_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("dpo2")
    run_training(tiny_world, run, "method.name=dpo", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
                 "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", nproc=2)
    return run


@pytest.mark.parametrize("method", ["dpo", pytest.param("simpo", marks=pytest.mark.slow)])  # a training per row: slow
def test_loss_decreases_on_demo_pairs(tiny_world, tmp_path, method):
    # 8 demo pairs = one global batch (micro 4 x 2 ranks), seen once per epoch for 8 epochs: fit them.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(tiny_world.train_path.read_text().splitlines(keepends=True)[:8]))
    run_training(tiny_world, tmp_path / "run", f"method.name={method}", f"data.path={pairs}",
                 "train.micro_batch_size=4", "train.epochs=8", "optim.lr=2e-3", "optim.schedule=constant",
                 "optim.warmup_steps=0", nproc=2)
    loss = read_scalars(tmp_path / "run", "train/loss")
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 0.1, loss
    assert loss[8] == min(loss.values()), loss


def test_zero3_partitions_parameters(dpo_two_ranks):
    summary = json.loads((dpo_two_ranks / "summary.json").read_text())
    per_rank, total = summary["parameters_per_rank"], summary["parameters_total"]
    assert summary["world_size"] == 2 and len(per_rank) == 2
    for local in per_rank:  # each rank holds about half (ZeRO pads partitions to equal size)
        assert 0.45 * total <= local <= 0.55 * total, (per_rank, total)


def test_two_ranks_match_one_rank_with_same_global_batch(tiny_world, dpo_two_ranks, tmp_path):
    run_training(tiny_world, tmp_path, "method.name=dpo", "train.micro_batch_size=4", f"train.max_steps={STEPS}",
                 "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", nproc=1)
    one, two = read_scalars(tmp_path, "train/loss"), read_scalars(dpo_two_ranks, "train/loss")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert one[step] == pytest.approx(two[step], abs=2e-5), (step, one, two)
    for tag in ("rewards/chosen", "logps/rejected", "num_tokens", "grad_norm"):  # means and sums over ranks
        one, two = read_scalars(tmp_path, f"train/{tag}"), read_scalars(dpo_two_ranks, f"train/{tag}")
        assert all(one[s] == pytest.approx(two[s], rel=1e-4, abs=1e-5) for s in one), (tag, one, two)


def test_tensorboard_has_the_named_scalars(dpo_two_ranks):
    for tag in ["loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "lr", "learning_rate", "grad_norm", "epoch",
                "num_tokens", "tokens_per_s", "step_time", "ref_wait", "entropy", "mean_token_accuracy"]:
        values = read_scalars(dpo_two_ranks, f"train/{tag}")
        assert len(values) == STEPS, tag
    vocab_log = math.log(400)  # the tiny world's vocabulary: entropy is between 0 and log V
    assert all(0 < v < vocab_log for v in read_scalars(dpo_two_ranks, "train/entropy").values())
    assert all(0 <= v <= 1 for v in read_scalars(dpo_two_ranks, "train/mean_token_accuracy").values())


def test_final_model_loads_with_transformers(dpo_two_ranks, tiny_world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = dpo_two_ranks / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    ref = AutoModelForCausalLM.from_pretrained(tiny_world.sft_dir)
    AutoTokenizer.from_pretrained(final)
    names = [n for n, _ in model.named_parameters()]
    unmoved = [n for n, a, b in zip(names, model.parameters(), ref.parameters()) if torch.equal(a, b)]
    # every trained tensor came back from its ZeRO-3 shards: a partition left out would keep the SFT values
    assert unmoved == [] and all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.numel() > 0 for p in model.parameters())


def test_resolved_config_and_ds_config_in_run_dir(dpo_two_ranks):
    from sparsepo.config import load_config

    cfg = load_config(dpo_two_ranks / "config.yaml")
    assert cfg.train.max_steps == STEPS
    ds = json.loads((dpo_two_ranks / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["zero_optimization"]["stage"] == 3


def test_finished_run_dir_is_not_overwritten(tiny_world, dpo_two_ranks):
    proc = run_training(tiny_world, dpo_two_ranks, "train.micro_batch_size=2", f"train.max_steps={STEPS}",
                        check=False)
    assert proc.returncode == 1
    assert "already holds a finished run" in proc.stderr + proc.stdout


def test_inline_reference_matches_cached_reference(tiny_world, dpo_two_ranks, tmp_path):
    # reference forward inside the policy step (TRL's way) = reading the precomputed cache
    run_training(tiny_world, tmp_path, "method.name=dpo", "train.micro_batch_size=4", f"train.max_steps={STEPS}",
                 "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", "reference.mode=inline", nproc=1)
    assert not (tmp_path / "ref_cache").exists()
    inline, cached = read_scalars(tmp_path, "train/loss"), read_scalars(dpo_two_ranks, "train/loss")
    for step in cached:
        assert inline[step] == pytest.approx(cached[step], abs=2e-5), (step, inline, cached)
