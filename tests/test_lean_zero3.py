"""The lean log-prob path under ZeRO-3 on 2 ranks (CPU, gloo): the regression test for the hang.

With one lm_head call per chunk, ranks whose micro-batches hold different numbers of response tokens
ran different numbers of head calls, so ZeRO-3's all-gathers of the head's weight no longer matched
across ranks and the run hung (tests/test_live.py's 2-rank cache fixture with logits_chunk=128).
Here logits_chunk=1 makes every rank's chunk count its response-token count, which differs between
the ranks' micro-batches (asserted from the data), and the run must finish within the timeout with
the per-step losses and the final weights of the plain path (logits_chunk=0), to float32 tolerance.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_lean_zero3.py
"""

import json

import pytest
import torch

from conftest import REPO, read_scalars, run_training

pytestmark = pytest.mark.distributed
STEPS = 3
COMMON = ("method.name=dpo", "reference.mode=inline", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
          "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_steps=0")


def final_weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted((run / "final").glob("*.safetensors")) for k, v in load_file(f).items()}


def response_tokens_per_rank(world, steps: int) -> list[tuple[int, int]]:
    """(rank 0, rank 1) response tokens (chosen + rejected) of each step's micro-batch: the chunk count
    of each rank's policy forward with logits_chunk=1."""
    from conftest import RECIPE
    from sparsepo.config import load_config
    from sparsepo.data import load_preference_dataset
    from sparsepo.models import load_tokenizer
    from sparsepo.schedule import Schedule

    cfg = load_config(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}", *COMMON])
    ds, _ = load_preference_dataset(cfg.data, load_tokenizer(cfg.model.path))
    schedule = Schedule.from_config(cfg, num_rows=len(ds), dp=2)
    return [tuple(sum(len(ds[i]["chosen_ids"]) + len(ds[i]["rejected_ids"]) for i in schedule.rows_for(step, 0, r))
                  for r in range(2)) for step in range(steps)]


def test_lean_zero3_with_unequal_lengths_across_ranks_finishes_and_equals_the_plain_path(tiny_world, tmp_path):
    """ZeRO-3 with stage3_param_persistence_threshold 0: every weight of the tiny model (the head too) is
    partitioned and all-gathered per module call, as at real size (the default file keeps weights under
    1e5 elements whole on every rank)."""
    counts = response_tokens_per_rank(tiny_world, STEPS)
    assert all(a != b for a, b in counts), counts  # every step: different chunk counts on the two ranks
    stage = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    stage["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_partition_all.json").write_text(json.dumps(stage))
    runs = {}
    for chunk in (0, 1):
        runs[chunk] = tmp_path / f"chunk{chunk}"
        run_training(tiny_world, runs[chunk], *COMMON, f"model.logits_chunk={chunk}",
                     f"deepspeed.stage_file={tmp_path / 'zero3_partition_all.json'}", nproc=2, timeout=240)
    plain, lean = (read_scalars(runs[c], "train/loss") for c in (0, 1))
    assert sorted(plain) == list(range(1, STEPS + 1)) and lean.keys() == plain.keys(), (plain, lean)
    for step in plain:
        assert abs(lean[step] - plain[step]) <= 1e-5, (step, plain, lean)
    assert len({round(v, 6) for v in plain.values()}) > 1  # the policy moved
    w0, w1 = final_weights(runs[0]), final_weights(runs[1])
    assert w0.keys() == w1.keys() and w0
    for name in w0:
        scale = max(1.0, float(w0[name].abs().max()))
        assert (w1[name].float() - w0[name].float()).abs().max() <= 1e-5 * scale, name
