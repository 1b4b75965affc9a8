"""checkpoint.async_write: DeepSpeed's decoupled checkpoint engine writes while the next step runs; the
checkpoint is sealed (sha256s, sparsepo.json, `latest`) only after DeepSpeed has committed it, and a
resume from it continues the same curve. The writer process never outlives its rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import RECIPE, REPO, read_scalars, run_training, train_command, train_env

ASYNC = ("method.name=dpo", "optim.schedule=constant", "optim.warmup_steps=2", "optim.lr=1e-3",
         "checkpoint.every_steps=2", "checkpoint.async_write=true", "train.micro_batch_size=4")


def run_processes(run: Path) -> list[int]:
    """Processes (ranks and their writers) whose command line names this run directory."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(run) in part for part in (p.info["cmdline"] or [])):
            found.append(p.info["pid"])
    return found


@pytest.mark.unit
def test_async_write_asks_deepspeed_for_its_decoupled_writer(tmp_path):
    from sparsepo.config import ConfigError, load_config
    from sparsepo.config.ds_json import build_deepspeed_config

    ds = build_deepspeed_config(load_config(None, ["checkpoint.async_write=true"]), dp_size=1, cuda=False)
    assert ds["checkpoint"]["writer"] == {"type": "python", "decoupled": True}
    assert "checkpoint" not in build_deepspeed_config(load_config(None, []), dp_size=1, cuda=False)
    stage = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    stage["checkpoint"] = {"writer": {"type": "python", "decoupled": True}}
    (tmp_path / "mine.json").write_text(json.dumps(stage))
    with pytest.raises(ConfigError, match="checkpoint.async_write=true"):
        build_deepspeed_config(load_config(None, [f"deepspeed.stage_file={tmp_path / 'mine.json'}"]), dp_size=1,
                               cuda=False)


@pytest.mark.distributed
def test_async_checkpoints_are_sealed_whole_and_resume_the_same_curve(tiny_world, tmp_path):
    from sparsepo.checkpoint import is_valid

    run = tmp_path / "run"
    proc = run_training(tiny_world, run, *ASYNC, "train.max_steps=6")
    assert "handed to the writer" in proc.stdout + proc.stderr  # step 2 and 4 went through the writer
    ckpts = run / "checkpoints"
    for tag in ("step-00000004", "step-00000006"):
        assert is_valid(ckpts / tag) == (True, ""), tag
    assert not run_processes(run), "a rank or its checkpoint writer outlived the run"
    full = read_scalars(run, "train/loss")

    resumed = tmp_path / "resumed"  # the async checkpoint of step 4, resumed to step 6
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "step-00000004", resumed / "checkpoints" / "step-00000004")
    run_training(tiny_world, resumed, *ASYNC, "train.max_steps=6",
                 resume=str(resumed / "checkpoints" / "step-00000004"))
    again = read_scalars(resumed, "train/loss")
    assert sorted(again) == [5, 6]
    assert all(abs(again[s] - full[s]) <= 1e-6 for s in (5, 6)), (again, full)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_leaves_no_writer_and_its_unsealed_checkpoint_is_skipped(tiny_world, tmp_path):
    run = tmp_path / "run"
    cmd = train_command(RECIPE, [f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                                 f"logging.output_dir={run}", "logging.progress=false", *ASYNC,
                                 "checkpoint.every_steps=1", "train.micro_batch_size=2", "train.max_steps=100000"],
                        nproc=2, resume=None)
    proc = subprocess.Popen(cmd, env=train_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "latest").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    import psutil

    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
    os.kill(ranks[0].pid, signal.SIGKILL)  # one rank (and not its writer child) dies mid-run
    proc.wait(timeout=120)
    deadline = time.monotonic() + 30
    while run_processes(run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not run_processes(run), "a checkpoint writer outlived its killed rank"
    from sparsepo.checkpoint import find_resume, is_valid
    from sparsepo.config import load_config

    picked = find_resume(load_config(run / "config.yaml", ["checkpoint.resume=auto"]))  # unsealed ones skipped
    assert picked is not None and is_valid(picked) == (True, "")
