"""The run directory's lock: one writer at a time, refused before it touches anything.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_rundir.py -q

The holder is another process (a Python that takes the lock and sleeps), as a second `sparsepo train`
into the same logging.output_dir would be.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_training
from sparsepo.rundir import LOCK, RunDirError, acquire_run_lock, release_run_dir

HOLD = ("import sys, time\nfrom sparsepo.rundir import acquire_run_lock\n"
        "acquire_run_lock(sys.argv[1]); print('locked', flush=True); time.sleep(600)")


@pytest.fixture()
def holder(tmp_path):
    """Start a process holding `run`'s lock; yields (run, its pid)."""
    procs = []

    def start(run: Path) -> int:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.unit
def test_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    run = tmp_path / "run"
    pid = holder(run)
    with pytest.raises(RunDirError) as e:
        acquire_run_lock(run)
    msg = str(e.value)
    assert f"{run} is in use by another run (host {socket.gethostname()}, pid {pid}, since 20" in msg, msg
    assert "choose another logging.output_dir" in msg


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_lock_of_a_dead_process_is_stale_not_a_conflict(tmp_path, holder, caplog):
    run = tmp_path / "run"
    pid = holder(run)
    os.kill(pid, 9)  # a crash: the kernel drops the flock, the file stays
    os.waitpid(pid, 0)
    assert json.loads((run / LOCK).read_text())["pid"] == pid
    with caplog.at_level("INFO", logger="sparsepo"):
        acquire_run_lock(run)
    try:
        assert f"stale lock {run / LOCK}" in caplog.text and f"pid {pid}" in caplog.text
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
        acquire_run_lock(run)  # re-entrant in the holding process
    finally:
        release_run_dir(run)
    assert (run / LOCK).read_text() == ""  # released: empty, and free for the next run
    holder(run)


@pytest.mark.distributed
@pytest.mark.parametrize("nproc, mode", [(1, "cache"), pytest.param(2, "cache", marks=pytest.mark.slow), (1, "precompute")])
def test_training_into_a_locked_run_dir_is_refused_and_touches_nothing(tiny_world, tmp_path, holder, nproc, mode):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "sparsepo.json").write_text("{}")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (run / "config.yaml").write_text("# the other run's\n")
    pid = holder(run)

    def snapshot():
        return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(run.rglob("*")) if p.is_file()}

    before = snapshot()
    # logging.overwrite=true would delete checkpoints/ and tensorboard/ if the run got that far
    proc = run_training(tiny_world, run, "logging.overwrite=true", "train.max_steps=2", f"reference.mode={mode}",
                        nproc=nproc, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert f"is in use by another run (host {socket.gethostname()}, pid {pid}, since" in proc.stderr, out[-3000:]
    assert snapshot() == before and not (run / "ref_cache").exists()


@pytest.mark.distributed
def test_precompute_after_a_crashed_holder_takes_the_stale_lock_and_releases_it(tiny_world, tmp_path, holder):
    run = tmp_path / "run"
    pid = holder(run)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    proc = run_training(tiny_world, run, "reference.mode=precompute")
    assert f"stale lock {run / LOCK}" in proc.stderr and f"pid {pid}" in proc.stderr, proc.stderr[-3000:]
    assert (run / "ref_cache" / "index.json").is_file()
    assert (run / LOCK).read_text() == ""  # released at the end of the run
