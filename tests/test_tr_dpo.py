"""TR-DPO (issue 24): a reference that follows the policy, `reference.sync_alpha` / `sync_steps`, in
inline mode (live mode: tests/test_tr_dpo_live.py); the modes and methods that cannot serve a moving
reference refuse it.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_tr_dpo.py

The end-to-end check rests on one exact fact: right after a hard update (α = 1) the reference IS the
policy, so at the next step every log-ratio is 0 and DPO's loss is log 2 exactly — on one rank and on
two ZeRO-3 ranks, where the policy's parameters are gathered one at a time (a broken gather leaves
shards, not the policy, in the reference, and the loss moves off log 2).
"""

import math

import pytest
import torch

from conftest import read_scalars, run_training
from sparsepo.config import ConfigError, load_config
from sparsepo.follow import due, mix_, mix_named

LN2 = math.log(2.0)
INLINE = ("method.name=dpo", "reference.mode=inline", "optim.lr=5e-3", "optim.schedule=constant",
          "optim.warmup_steps=0", "train.micro_batch_size=4")


@pytest.mark.unit
def test_soft_and_hard_updates_by_hand():
    """α = 0.25: 0.25·(4, −8) + 0.75·(0, 8) = (1, 4); α = 1 copies exactly; shapes must agree."""
    target, source = torch.tensor([0.0, 8.0]), torch.tensor([4.0, -8.0])
    mix_(target, source, 0.25)
    assert target.tolist() == [1.0, 4.0]
    mix_(target, source, 1.0)
    assert torch.equal(target, source)
    with pytest.raises(ValueError, match="policy's architecture"):
        mix_(torch.zeros(3), torch.zeros(2), 0.5)
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(2.0), model.bias.fill_(-1.0)
    assert mix_named(model, [("weight", torch.zeros(1, 2)), ("bias", torch.ones(1))], 0.5) == 2
    assert model.weight.tolist() == [[1.0, 1.0]] and model.bias.tolist() == [0.0]
    with pytest.raises(ValueError, match="no parameter 'head'"):
        mix_named(model, [("head", torch.zeros(1))], 0.5)


@pytest.mark.unit
def test_the_schedule_and_the_refusals():
    cfg = load_config(None, [*INLINE, "reference.sync_alpha=0.6", "reference.sync_steps=3"])
    assert [s for s in range(1, 10) if due(cfg, s)] == [3, 6, 9]
    assert not any(due(load_config(None, list(INLINE)), s) for s in range(1, 10))
    for mode, word in (("cache", "cache holds one fixed reference"), ("precompute", "cache holds one fixed")):
        with pytest.raises(ConfigError, match=word):
            load_config(None, ["method.name=dpo", f"reference.mode={mode}", "reference.sync_alpha=0.5"])
    live = ["reference.mode=live", "reference.sync_alpha=0.5", "topology.reference_ranks=1"]
    load_config(None, ["method.name=dpo", *live])  # the group follows the policy (test_tr_dpo_live.py)
    load_config(None, ["method.name=dpo", *live, "eval.fraction=0.1"])  # evaluated by the moved reference
    load_config(None, ["method.name=spo", *live])  # samples scored by the moved reference (test_tr_dpo_live.py)
    with pytest.raises(ConfigError, match=r"sync_alpha=1\.5 must be in \(0, 1\]"):
        load_config(None, [*INLINE, "reference.sync_alpha=1.5"])
    with pytest.raises(ConfigError, match="sync_steps=0 must be"):
        load_config(None, [*INLINE, "reference.sync_alpha=0.5", "reference.sync_steps=0"])
    with pytest.raises(ConfigError, match="method 'simpo' reads no reference"):
        load_config(None, ["method.name=simpo", "reference.mode=inline", "reference.sync_alpha=0.5"])


@pytest.mark.integration
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_after_a_hard_update_the_loss_is_log_2(tiny_world, tmp_path, nproc):
    """sync_alpha=1 every 2 steps: steps 1 and 3 start from reference = policy (loss log 2 to float32
    precision), step 2 and 4 do not (the policy moved at lr 5e-3); without TR-DPO step 3 is not log 2."""
    run = tmp_path / "tr"
    run_training(tiny_world, run, *INLINE, "reference.sync_alpha=1.0", "reference.sync_steps=2",
                 "train.max_steps=4", nproc=nproc)
    loss = read_scalars(run, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4]
    assert abs(loss[1] - LN2) < 1e-5 and abs(loss[3] - LN2) < 1e-5, loss
    assert abs(loss[2] - LN2) > 1e-4 and abs(loss[4] - LN2) > 1e-4, loss
    if nproc == 1:
        plain = tmp_path / "plain"
        run_training(tiny_world, plain, *INLINE, "train.max_steps=3", nproc=1)
        assert abs(read_scalars(plain, "train/loss")[3] - LN2) > 1e-4


@pytest.mark.integration
@pytest.mark.slow
def test_a_resumed_soft_update_run_continues_from_the_moved_reference(tiny_world, tmp_path):
    """α = 0.5 every step, 4 steps with a checkpoint at step 2; resumed from it, steps 3 and 4 log the
    uninterrupted run's losses (the reference comes back from reference-rank0.pt, not from the start)."""
    soft = (*INLINE, "reference.sync_alpha=0.5", "reference.sync_steps=1", "checkpoint.every_steps=2")
    full = tmp_path / "full"
    run_training(tiny_world, full, *soft, "train.max_steps=4", nproc=1)
    part = tmp_path / "part"
    run_training(tiny_world, part, *soft, "train.max_steps=2", nproc=1)
    assert (part / "checkpoints" / "step-00000002" / "reference-rank0.pt").is_file()
    run_training(tiny_world, part, *soft, "train.max_steps=4", nproc=1, resume="auto")
    want, got = read_scalars(full, "train/loss"), read_scalars(part, "train/loss")
    for step in (3, 4):
        assert abs(got[step] - want[step]) < 1e-6, (step, got, want)


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow  # 25 s; re-cutting in the default run: test_tr_dpo_live.py (slices, by hand)
def test_a_soft_update_run_resumes_on_another_world_size_from_the_moved_reference(tiny_world, tmp_path):
    """Written on 2 ranks at step 2 (α = 0.5 every step), resumed on 1: steps 3 and 4 log the
    uninterrupted 2-rank run's losses (reference-rank0.pt is read on the new world; the policy comes
    back through DeepSpeed's universal checkpoint), not those of a run whose reference restarted."""
    soft = (*INLINE, "train.micro_batch_size=2", "reference.sync_alpha=0.5", "reference.sync_steps=1",
            "checkpoint.every_steps=2")
    full, part = tmp_path / "full", tmp_path / "part"
    run_training(tiny_world, full, *soft, "train.max_steps=4", nproc=2)
    run_training(tiny_world, part, *soft, "train.max_steps=2", nproc=2)
    run_training(tiny_world, part, *soft, "train.max_steps=4", "train.micro_batch_size=4", nproc=1,
                 resume="auto")  # the same global batch of 4 pairs
    want, got = read_scalars(full, "train/loss"), read_scalars(part, "train/loss")
    for step in (3, 4):
        assert abs(got[step] - want[step]) < 1e-5, (step, got, want)
