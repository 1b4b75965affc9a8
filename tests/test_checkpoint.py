"""Sharded checkpoints and exact resume, end to end on the tiny demo world (CPU, gloo).

One uninterrupted 2-rank run of STEPS steps is the reference; every interrupted run below must
reproduce its per-step losses. All runs use a constant LR after a 3-step warmup: the LR then does
not depend on train.max_steps (so "stop at N/2 with max_steps=N/2, resume with max_steps=N" is
exact), while resuming at step 2 or 6 with a scheduler that did not round-trip would show at once
(its LR would restart from the warmup). With cosine/linear, changing max_steps on resume changes the
rest of the schedule; checkpoint.restore applies the new rate and warns (tests/test_resume_length.py).

Launches (a 2-rank one is ~10 s on an idle 2-core box, 30-70 s on a loaded one): the reference;
half + resume; 2 -> 1 ranks; SIGKILL -> resume + SIGUSR1 -> resume (one run directory); a corrupt
copy of the reference: explicit path refused (1 rank) + auto fallback; beta refusal (1 rank); export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import RECIPE, REPO, read_scalars, run_training, train_command, train_env

pytestmark = pytest.mark.distributed

STEPS, HALF, EVERY = 12, 6, 2
COMMON = ("method.name=dpo", "optim.schedule=constant", "optim.warmup_steps=3", "optim.lr=1e-3",
          f"checkpoint.every_steps={EVERY}")
TWO_RANKS = ("train.micro_batch_size=2",)  # global batch 4 = 2 x 2 ranks
ONE_RANK = ("train.micro_batch_size=4",)   # the same global batch on 1 rank
EXACT = 1e-6


def tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*") if not p.name.endswith(("_universal", ".tmp")))


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def output(proc) -> str:
    return proc.stdout + proc.stderr


def assert_losses_match(got: dict, want: dict, steps, tol: float) -> None:
    missing = [s for s in steps if s not in got]
    assert not missing, f"steps {missing} not logged: {sorted(got)}"
    bad = {s: (got[s], want[s]) for s in steps if abs(got[s] - want[s]) > tol}
    assert not bad, f"losses differ beyond {tol} at {bad}"


def load_weights(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def assert_same_weights(a: Path, b: Path, tol: float) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"weights of {a} and {b} differ by up to {worst}"


def launch(world, run: Path, *overrides, nproc: int, resume: str | None = None, check: bool = True):
    """conftest.run_training, failing with both outputs."""
    proc = run_training(world, run, *overrides, nproc=nproc, resume=resume, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}): {' '.join(proc.args)}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# ------------------------------------------------------------------------------------------
# Runs shared by the module

@pytest.fixture(scope="module")
def full(tiny_world, tmp_path_factory):
    """The uninterrupted reference: STEPS steps on 2 ranks, checkpoints every EVERY steps."""
    run = tmp_path_factory.mktemp("full")
    launch(tiny_world, run, *COMMON, *TWO_RANKS, f"train.max_steps={STEPS}", nproc=2)
    return run


@pytest.fixture(scope="module")
def half(tiny_world, tmp_path_factory):
    """HALF steps on 2 ranks (stopped by max_steps); `copy` is a pristine copy for the 2 -> 1 test."""
    run = tmp_path_factory.mktemp("half")
    launch(tiny_world, run, *COMMON, *TWO_RANKS, f"train.max_steps={HALF}", nproc=2)
    copy = run.with_name(run.name + "-copy")
    shutil.copytree(run, copy)
    return SimpleNamespace(run=run, copy=copy)


def popen_training(world, run: Path, *overrides, nproc: int, resume: str | None, log: Path):
    """Like conftest.run_training, without waiting: its own session, so the group can be SIGKILLed."""
    cmd = train_command(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                 f"logging.output_dir={run}", "logging.progress=false", "logging.log_every=1",
                                 *overrides], nproc=nproc, resume=resume)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=train_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(cond, proc, log: Path, timeout: float = 240.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}:\n{log.read_text()[-5000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-5000:]}")


def logged_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"\] \[rank 0\] INFO sparsepo: step (\d+) loss=", text)]


def rank_pid(launcher_pid: int, local_rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        if f"--local_rank={local_rank}" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError(f"no rank {local_rank} under {launcher_pid}")


@pytest.fixture(scope="module")
def interrupted(tiny_world, tmp_path_factory):
    """One run directory through what can stop a run:
    1. a long 2-rank run, SIGKILLed (its whole process group) right after its first checkpoint;
    2. resume=auto (still long), SIGUSR1 to rank 1 only, after two steps -> checkpoint, exit 3;
    3. resume=auto with max_steps=STEPS, from the preemption checkpoint, to the end."""
    from sparsepo.checkpoint import CheckpointError, find_resume, is_valid
    from sparsepo.config import load_config

    run = tmp_path_factory.mktemp("interrupted")
    ckpts = run / "checkpoints"
    long = (*COMMON, *TWO_RANKS, "train.max_steps=400")
    s = SimpleNamespace(run=run)

    log1 = run.with_name(run.name + "-killed.log")
    p = popen_training(tiny_world, run, *long, nproc=2, resume=None, log=log1)
    # complete = sealed (sparsepo.json) and published (`latest`, written right after): a kill between the
    # two is a valid checkpoint without `latest`, which this scenario does not look at
    wait_until(lambda: (ckpts / "latest").is_file(), p, log1, what="the first checkpoint")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    s.killed_log = log1.read_text()
    s.killed_last_step = max(logged_steps(s.killed_log))
    s.after_kill_tags, s.after_kill_latest = tags(run), latest(run)
    s.after_kill_latest_valid = is_valid(ckpts / s.after_kill_latest)
    try:  # the interrupted run's directory without checkpoint.resume: refused, with the hint
        find_resume(load_config(run / "config.yaml", ["checkpoint.resume=null"]))
        s.no_resume_error = None
    except CheckpointError as e:
        s.no_resume_error = str(e)

    log2 = run.with_name(run.name + "-preempted.log")
    p = popen_training(tiny_world, run, *long, nproc=2, resume="auto", log=log2)
    s.resumed_after_kill = int(wait_until(
        lambda: (m := re.search(r"continuing at step (\d+)", log2.read_text())) and m.group(1), p, log2,
        what="the resume"))
    # the signal handlers are installed before the first step after the resume; waiting for the second
    # (an even step: checkpoints are every 2) makes the preemption land on an odd step, between checkpoints
    wait_until(lambda: s.resumed_after_kill + 2 in logged_steps(log2.read_text()), p, log2,
               what="the second step after the resume")
    os.kill(rank_pid(p.pid, 1), signal.SIGUSR1)  # one rank only: the other must stop at the same step
    s.preempt_rc = p.wait(timeout=180)
    s.preempted_log = log2.read_text()
    s.preempted_steps = {int(r): int(k) for r, k in
                         re.findall(r"\[rank (\d)\] WARNING sparsepo: preempted at step (\d+)", s.preempted_log)}
    s.preempt_step = max(s.preempted_steps.values(), default=-1)
    s.after_preempt_tags, s.after_preempt_latest = tags(run), latest(run)
    s.after_preempt_valid = is_valid(ckpts / s.after_preempt_latest)
    assert s.preempt_step < STEPS, f"preempted too late (step {s.preempt_step}) to test the rest: {s.preempted_steps}"

    s.final = launch(tiny_world, run, *COMMON, *TWO_RANKS, f"train.max_steps={STEPS}", nproc=2, resume="auto")
    return s


@pytest.fixture(scope="module")
def corrupted(tiny_world, full, tmp_path_factory):
    """A copy of the reference run whose newest checkpoint lost half of a shard (a full disk, a copy
    cut short): an explicit resume from it (1 rank) is refused; resume=auto (2 ranks) skips it and a
    newer partial save, resumes from the one before, and ends as the reference did."""
    run = tmp_path_factory.mktemp("corrupted")
    shutil.rmtree(run)
    shutil.copytree(full, run)
    newest = run / "checkpoints" / f"step-{STEPS:08d}"
    shard = max(newest.glob("*optim_states.pt"), key=lambda f: f.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    explicit = launch(tiny_world, run, *COMMON, *TWO_RANKS, f"train.max_steps={STEPS}", nproc=1,
                      resume=str(newest), check=False)
    # and a newer save that died before its sparsepo.json: skipped, then removed as an abandoned future
    partial = run / "checkpoints" / f"step-{STEPS + EVERY:08d}"
    shutil.copytree(run / "checkpoints" / f"step-{STEPS - EVERY:08d}", partial)
    (partial / "sparsepo.json").unlink()
    auto = launch(tiny_world, run, *COMMON, *TWO_RANKS, f"train.max_steps={STEPS}", nproc=2, resume="auto")
    return SimpleNamespace(run=run, corrupt=newest, partial=partial, explicit=explicit, auto=auto)


@pytest.fixture(scope="module")
def bitflipped(tiny_world, full, tmp_path_factory):
    """A copy of the reference run whose newest checkpoint has one byte of an optimizer shard flipped,
    its size kept (a bad disk, a bad copy): refused when named (1 rank), skipped by resume=auto
    (2 ranks, each hashing its own shards), which resumes from the one before."""
    run = tmp_path_factory.mktemp("bitflipped")
    shutil.rmtree(run)
    shutil.copytree(full, run)
    newest = run / "checkpoints" / f"step-{STEPS:08d}"
    shard = max(newest.glob("*rank_1_*optim_states.pt"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    explicit = launch(tiny_world, run, *COMMON, *TWO_RANKS, f"train.max_steps={STEPS}", nproc=1,
                      resume=str(newest), check=False)
    auto = launch(tiny_world, run, *COMMON, *TWO_RANKS, f"train.max_steps={STEPS}", nproc=2, resume="auto")
    return SimpleNamespace(run=run, corrupt=newest, shard=shard, explicit=explicit, auto=auto)


# ------------------------------------------------------------------------------------------
# Resume equality

def test_reference_run_keeps_last_two_checkpoints_and_latest(full):
    from sparsepo.checkpoint import is_valid

    assert tags(full) == [f"step-{STEPS - EVERY:08d}", f"step-{STEPS:08d}"]  # keep_last=2 pruned the rest
    assert latest(full) == f"step-{STEPS:08d}"
    assert is_valid(full / "checkpoints" / latest(full)) == (True, "")
    meta = json.loads((full / "checkpoints" / latest(full) / "sparsepo.json").read_text())
    assert meta["step"] == STEPS and meta["samples"] == STEPS * 4 and meta["world_size"] == 2
    assert sorted(read_scalars(full, "train/loss")) == list(range(1, STEPS + 1))


def test_resume_at_half_is_exact(tiny_world, full, half):
    proc = launch(tiny_world, half.run, *COMMON, *TWO_RANKS, f"train.max_steps={STEPS}", nproc=2, resume="auto")
    assert f"resumed from {half.run / 'checkpoints' / f'step-{HALF:08d}'}" in output(proc)
    assert f"continuing at step {HALF}" in output(proc)
    want = read_scalars(full, "train/loss")
    assert_losses_match(read_scalars(half.run, "train/loss"), want, range(1, STEPS + 1), EXACT)
    # metrics.jsonl holds each step once, the resumed run's values (TensorBoard's last write)
    lines = [json.loads(line) for line in (half.run / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "train/loss" in line]
    assert {line["step"]: line["train/loss"] for line in lines} == pytest.approx(read_scalars(half.run, "train/loss"))
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    # the LR scheduler's position round-tripped (a fresh scheduler would restart the warmup)
    assert_losses_match(read_scalars(half.run, "train/lr"), read_scalars(full, "train/lr"), range(1, STEPS + 1), 0)
    # TRL's num_tokens continues from the checkpoint (it restarted at 0 before it was recorded there)
    assert_losses_match(read_scalars(half.run, "train/num_tokens"), read_scalars(full, "train/num_tokens"),
                        range(HALF + 1, STEPS + 1), 0)
    assert_same_weights(half.run / "final", full / "final", EXACT)
    assert tags(half.run) == tags(full) and latest(half.run) == latest(full)


def test_resume_on_another_world_size_through_universal_checkpoint(tiny_world, full, half):
    # 2 ranks x 2 pairs -> 1 rank x 4 pairs: the same global batch, so the same data and steps
    run = half.copy
    proc = launch(tiny_world, run, *COMMON, *ONE_RANK, f"train.max_steps={STEPS}", nproc=1, resume="auto")
    out = output(proc)
    assert "converting" in out and "universal" in out, out[-3000:]
    assert f"continuing at step {HALF}" in out
    assert f"through {run / 'checkpoints' / f'step-{HALF:08d}_universal'}" in out
    assert_losses_match(read_scalars(run, "train/loss"), read_scalars(full, "train/loss"),
                        range(HALF + 1, STEPS + 1), 1e-5)
    assert_same_weights(run / "final", full / "final", 1e-5)
    meta = json.loads((run / "checkpoints" / latest(run) / "sparsepo.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == STEPS
    # the conversion was pruned with its checkpoint; DeepSpeed's latest_universal was not left behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == tags(full)
    assert not (run / "checkpoints" / "latest_universal").exists()


# ------------------------------------------------------------------------------------------
# SIGKILL, SIGUSR1, corruption (one run directory, see `interrupted`)

def test_sigkill_leaves_a_valid_latest_and_resume_loses_at_most_one_interval(interrupted):
    s = interrupted
    assert s.after_kill_latest_valid == (True, ""), s.after_kill_latest
    assert s.after_kill_latest in s.after_kill_tags
    assert s.no_resume_error and "checkpoint.resume=auto" in s.no_resume_error
    # resumed from the last complete checkpoint: at most one interval of the killed run's steps is lost
    assert s.resumed_after_kill >= 2 and s.resumed_after_kill % EVERY == 0
    assert s.killed_last_step - s.resumed_after_kill <= EVERY, (s.killed_last_step, s.resumed_after_kill)
    assert f"step-{s.resumed_after_kill:08d}" in s.after_kill_tags


def test_sigusr1_stops_all_ranks_at_one_step_with_a_checkpoint(interrupted):
    s = interrupted
    assert s.preempt_rc == 3, s.preempted_log[-4000:]
    assert set(s.preempted_steps) == {0, 1}, s.preempted_log[-4000:]  # both ranks, though only rank 1 got it
    assert len(set(s.preempted_steps.values())) == 1, s.preempted_steps
    assert s.preempt_step > s.resumed_after_kill
    assert s.after_preempt_latest == f"step-{s.preempt_step:08d}" == s.after_preempt_tags[-1]
    assert s.after_preempt_valid == (True, "")  # written at whatever step the signal arrived


def test_interrupted_run_resumes_from_the_preemption_checkpoint_and_ends_as_uninterrupted(interrupted, full):
    from sparsepo.checkpoint import is_valid

    s = interrupted
    assert f"resumed from {s.run / 'checkpoints' / s.after_preempt_latest}" in output(s.final)
    assert_losses_match(read_scalars(s.run, "train/loss"), read_scalars(full, "train/loss"),
                        range(1, STEPS + 1), EXACT)
    assert_same_weights(s.run / "final", full / "final", EXACT)
    assert is_valid(s.run / "checkpoints" / latest(s.run)) == (True, "")
    assert tags(s.run) == tags(full) and latest(s.run) == f"step-{STEPS:08d}"


def test_corrupt_checkpoint_explicit_path_is_refused(corrupted):
    c = corrupted
    out = output(c.explicit)
    assert c.explicit.returncode == 1, out[-3000:]
    assert f"cannot resume from {c.corrupt}" in out and "truncated or modified" in out, out[-3000:]


def test_corrupt_newest_checkpoint_is_skipped_by_auto(corrupted, full):
    from sparsepo.checkpoint import is_valid

    c = corrupted
    out = output(c.auto)
    assert f"skipping checkpoint {c.partial}: sparsepo.json missing" in out, out[-3000:]
    assert f"skipping checkpoint {c.corrupt}" in out and "trying an older one" in out, out[-3000:]
    assert f"removing checkpoint {c.partial}" in out, out[-3000:]
    assert f"continuing at step {STEPS - EVERY}" in out
    assert_losses_match(read_scalars(c.run, "train/loss"), read_scalars(full, "train/loss"),
                        range(1, STEPS + 1), EXACT)
    assert_same_weights(c.run / "final", full / "final", EXACT)
    # the corrupt checkpoint was rewritten, the partial one removed; latest names a complete one
    assert tags(c.run) == tags(full) and latest(c.run) == f"step-{STEPS:08d}"
    assert is_valid(c.run / "checkpoints" / latest(c.run)) == (True, "")


def test_same_size_corruption_is_refused_or_skipped(bitflipped, full):
    b = bitflipped
    out = output(b.explicit)
    assert b.explicit.returncode == 1, out[-3000:]
    assert f"cannot resume from {b.corrupt}: {b.shard.name} does not match its recorded sha256" in out, out[-3000:]
    out = output(b.auto)
    assert f"skipping checkpoint {b.corrupt}: {b.shard.name} does not match its recorded sha256" in out, out[-3000:]
    assert f"continuing at step {STEPS - EVERY}" in out
    assert_same_weights(b.run / "final", full / "final", EXACT)


# ------------------------------------------------------------------------------------------
# Refusals

def test_checkpoint_of_another_config_is_refused_by_the_trainer(tiny_world, full, tmp_path):
    ckpt = full / "checkpoints" / f"step-{STEPS:08d}"
    proc = launch(tiny_world, tmp_path / "beta", *COMMON, *ONE_RANK, "method.beta=0.2", f"train.max_steps={STEPS}",
                  nproc=1, resume=str(ckpt), check=False)
    assert proc.returncode == 1, output(proc)[-3000:]
    assert "different config: method.beta: 0.1 -> 0.2" in output(proc), output(proc)[-3000:]


@pytest.fixture()
def ckpt_cfg(full):
    from sparsepo.config import load_config

    tag_dir = full / "checkpoints" / f"step-{STEPS:08d}"
    meta = json.loads((tag_dir / "sparsepo.json").read_text())
    return SimpleNamespace(tag_dir=tag_dir, meta=meta,
                           cfg=lambda *o: load_config(full / "config.yaml", ["checkpoint.resume=auto", *o]))


def test_compatibility_checks(ckpt_cfg, tmp_path):
    from sparsepo.checkpoint import CheckpointError, check_compatible

    c = ckpt_cfg
    fp = c.meta["data"]
    check_compatible(c.tag_dir, c.cfg(), data_fingerprint=fp, world_size=2)
    # the run length, the data's location and the split of the global batch may change
    check_compatible(c.tag_dir, c.cfg("train.max_steps=50", f"data.path={tmp_path / 'moved.jsonl'}",
                                      "train.micro_batch_size=1", "train.grad_accum=2"),
                     data_fingerprint=fp, world_size=2)
    with pytest.raises(CheckpointError, match=r"different config: method\.beta: 0\.1 -> 0\.2"):
        check_compatible(c.tag_dir, c.cfg("method.beta=0.2"), data_fingerprint=fp, world_size=2)
    with pytest.raises(CheckpointError, match="optim.lr"):
        check_compatible(c.tag_dir, c.cfg("optim.lr=2e-3"), data_fingerprint=fp, world_size=2)
    with pytest.raises(CheckpointError, match="different data"):
        check_compatible(c.tag_dir, c.cfg(), data_fingerprint="0" * 16, world_size=2)
    with pytest.raises(CheckpointError, match=r"global batch of 4 .*micro_batch_size x train.grad_accum x ranks = 4"):
        check_compatible(c.tag_dir, c.cfg(), data_fingerprint=fp, world_size=1)
    # a non-constant schedule with another run length is compatible (restore applies the new length's
    # rate from the first resumed step and warns once: tests/test_resume_length.py)
    cosine = tmp_path / "cosine"
    cosine.mkdir()
    meta = json.loads(json.dumps(c.meta))
    meta["config"]["optim"]["schedule"] = "cosine"
    (cosine / "sparsepo.json").write_text(json.dumps(meta))
    check_compatible(cosine, c.cfg("optim.schedule=cosine", "train.max_steps=24"), data_fingerprint=fp, world_size=2)


def test_find_resume(ckpt_cfg, full, tmp_path, caplog):
    from sparsepo.checkpoint import CheckpointError, find_resume

    c = ckpt_cfg
    with pytest.raises(CheckpointError, match=r"already holds checkpoints\. Continue .* checkpoint\.resume=auto"):
        find_resume(c.cfg("checkpoint.resume=null"))
    assert find_resume(c.cfg()) == c.tag_dir
    assert find_resume(c.cfg(f"checkpoint.resume={full}")) == c.tag_dir  # a run directory: its newest valid
    assert find_resume(c.cfg(f"checkpoint.resume={c.tag_dir}")) == c.tag_dir
    with pytest.raises(CheckpointError, match="cannot resume from .*: no such checkpoint directory"):
        find_resume(c.cfg(f"checkpoint.resume={tmp_path / 'nowhere'}"))
    # a fresh directory with resume=auto starts from scratch
    assert find_resume(c.cfg(f"logging.output_dir={tmp_path / 'fresh'}")) is None
    # partial / damaged checkpoints are skipped by auto, newest first
    run = tmp_path / "run"
    shutil.copytree(full / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "step-00000099").mkdir()  # a save killed before sparsepo.json
    (run / "checkpoints" / f"step-{STEPS:08d}" / "sparsepo.json").write_text("{ not json")
    with caplog.at_level("WARNING", logger="sparsepo"):
        found = find_resume(c.cfg(f"logging.output_dir={run}"))
    assert found == run / "checkpoints" / f"step-{STEPS - EVERY:08d}"
    assert "step-00000099: sparsepo.json missing" in caplog.text and "is damaged" in caplog.text


def test_is_valid_checks_every_recorded_file(full, tmp_path):
    from sparsepo.checkpoint import is_valid, seal

    tag = tmp_path / "step-00000012"
    shutil.copytree(full / "checkpoints" / "step-00000012", tag)
    assert is_valid(tag) == (True, "")
    (tag / "rng-rank1.pt").unlink()
    assert is_valid(tag) == (False, "rng-rank1.pt missing")
    meta = json.loads((tag / "sparsepo.json").read_text())
    del meta["files"]["rng-rank1.pt"]
    del meta["sha256"]["rng-rank1.pt"]
    shard = next(tag.glob("*model_states.pt"))
    with open(shard, "ab") as f:
        f.write(b"x")
    (tag / "sparsepo.json").write_text(seal(meta))  # re-sealed: a consistent sparsepo.json, one grown shard
    ok, why = is_valid(tag)
    assert not ok and shard.name in why and "truncated or modified" in why


def test_rng_state_round_trips(tmp_path):
    import random

    import numpy as np
    import torch

    from sparsepo import rng_state

    torch.save(rng_state.capture(), tmp_path / "rng-rank0.pt")
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    rng_state.restore(rng_state.load(tmp_path / "rng-rank0.pt"))  # weights_only: tensors and plain values
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


# ------------------------------------------------------------------------------------------
# Export

def test_export_matches_the_final_model(full, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "sparsepo.cli", "export", str(full / "checkpoints" / latest(full)),
                           str(out)], env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, output(proc)[-3000:]
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out)
    assert_same_weights(out, full / "final", EXACT)


def test_export_refuses_an_invalid_checkpoint(full, tmp_path):
    from sparsepo.checkpoint import CheckpointError
    from sparsepo.export import export_checkpoint

    with pytest.raises(CheckpointError, match="cannot export"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "out")
