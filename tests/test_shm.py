"""DeepSpeed's CPU shared-memory all-reduce (deepspeed_shm_comm) makes a 66 MB /dev/shm buffer per rank
that DeepSpeed never unlinks: a leak of one per test once filled the 24 GB /dev/shm of a CI machine
within one suite run. Training never uses that op (`engine.dist._without_shm_all_reduce`), so a run
must neither build it nor leave a buffer behind, even when it dies by SIGKILL (as launchers and
watchdogs end processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, train_env
from sparsepo.cli import train_command
from sparsepo.launch.ports import free_port

pytestmark = pytest.mark.integration


def test_a_killed_run_leaves_no_shared_memory_buffer(tiny_world, tmp_path):
    port = free_port()
    buffer = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    cmd = train_command(REPO / "sparsepo" / "recipes" / "demo.yaml",
                        [f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                         f"logging.output_dir={tmp_path / 'run'}", "logging.progress=false", "logging.log_every=1",
                         "train.epochs=50", "method.name=simpo"])
    env = train_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "step 2 " not in (tmp_path / "log").read_text():
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not buffer.exists(), f"{buffer} leaked"
    assert "shm_comm_op built" not in (tmp_path / "log").read_text()  # DeepSpeed prints this when it builds the op
