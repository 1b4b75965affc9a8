"""Resume on a larger world size through DeepSpeed's universal checkpoint (checkpoint.restore ->
ds_to_universal): 1 -> 2 and 2 -> 4 ranks, fp32, the same global batch of 4 pairs (4x1, 2x2, 1x4),
each equal to one uninterrupted 2-rank run to 1e-5 on every step after the resume and in the final
weights (the same tolerance as the 2 -> 1 test in test_checkpoint.py; ZeRO-3 partitions and
reduces in another order on another world size, so not bit-identical)."""

import pytest

from conftest import read_scalars
from test_checkpoint import assert_losses_match, assert_same_weights, launch, output

pytestmark = pytest.mark.distributed

STEPS, HALF = 8, 4
COMMON = ("method.name=dpo", "optim.schedule=constant", "optim.warmup_steps=2", "optim.lr=1e-3",
          "checkpoint.every_steps=4", "train.precision=fp32")
MICRO = {1: "train.micro_batch_size=4", 2: "train.micro_batch_size=2", 4: "train.micro_batch_size=1"}
TOL = 1e-5


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    launch(tiny_world, run, *COMMON, MICRO[2], f"train.max_steps={STEPS}", nproc=2)
    return run


@pytest.mark.parametrize("before, after", [(1, 2), (2, 4)])
def test_resume_on_more_ranks_matches_the_uninterrupted_run(tiny_world, uninterrupted, tmp_path, before, after):
    launch(tiny_world, tmp_path, *COMMON, MICRO[before], f"train.max_steps={HALF}", nproc=before)
    proc = launch(tiny_world, tmp_path, *COMMON, MICRO[after], f"train.max_steps={STEPS}", nproc=after,
                  resume="auto")
    out = output(proc)
    assert f"through {tmp_path / 'checkpoints' / f'step-{HALF:08d}_universal'}" in out, out[-3000:]
    assert f"continuing at step {HALF}" in out
    assert_losses_match(read_scalars(tmp_path, "train/loss"), read_scalars(uninterrupted, "train/loss"),
                        range(1, STEPS + 1), TOL)
    assert_same_weights(tmp_path / "final", uninterrupted / "final", TOL)
