"""Issue 25 end to end: a run whose loss goes non-finite fails, publishes no final/ and keeps its
checkpoints (sparsepo.guard in the loop of sparsepo.trainer). Before the guard this run printed
`done: final model`, exited 0 and published NaN weights."""

import pytest

from conftest import run_training
from sparsepo.checkpoint_integrity import is_valid


def _diverge(world, run, precision):
    # warmup 2 + constant schedule: step 1 trains at lr 0, step 2 at 5e29 (Adam's first update is ~lr per
    # element: weights ~1e29, still finite), so from step 3 on the forward overflows: loss NaN, DeepSpeed
    # skips the step. max_nonfinite_steps=1: step 3 is tolerated, step 4 fails the run.
    return run_training(world, run, "method.name=dpo", "train.micro_batch_size=4", "train.max_steps=6",
                        "optim.lr=1e30", "optim.warmup_steps=2", "optim.schedule=constant", "optim.grad_clip=0",
                        "checkpoint.every_steps=1", "checkpoint.keep_last=8", "train.max_nonfinite_steps=1",
                        f"train.precision={precision}", check=False)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_nan_loss_fails_the_run_without_publishing_final(tiny_world, tmp_path, precision):
    proc = _diverge(tiny_world, tmp_path, precision)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "non-finite step 3 (loss nan" in proc.stderr, proc.stderr[-3000:]
    assert "2 non-finite optimiser steps (this session: steps 3, 4) exceed train.max_nonfinite_steps=1" \
        in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "final").exists() and not (tmp_path / "summary.json").exists()
    tags = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert tags == ["step-00000001", "step-00000002", "step-00000003"], tags  # kept; none after the failure
    assert all(is_valid(tmp_path / "checkpoints" / tag) == (True, "") for tag in tags)
