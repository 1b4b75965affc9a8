"""Shared fixtures: a tiny offline demo world, and helpers to launch real training runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "sparsepo" / "recipes" / "demo.yaml"


from sparsepo.cli import train_command  # noqa: E402
from sparsepo.launch.ports import free_port  # noqa: E402,F401  (free_port is used by test modules)


ROLE_MARKERS = ("unit", "integration", "distributed", "slurm", "gpu")


def pytest_collection_modifyitems(config, items):
    """Every test gets one role marker, so `pytest -m unit` is the sub-minute loop: tests marked by
    their module keep theirs; a test that builds a demo world (`tiny_world`, or test_demo's own
    `world`: seconds to tens of seconds, once) is `integration`; everything else is a pure `unit` test."""
    for item in items:
        if any(item.get_closest_marker(m) for m in ROLE_MARKERS):
            continue
        builds_world = bool({"tiny_world", "world"} & set(item.fixturenames))
        item.add_marker(pytest.mark.integration if builds_world else pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The demo world at test size (tokenizer, SFT'd tiny Llama, preference pairs), built once."""
    from sparsepo.demo import prepare_world

    return prepare_world(tmp_path_factory.mktemp("world"), size="tiny", progress=False)


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_training(world, run_dir: Path, *overrides: str, nproc: int = 1, resume: str | None = None,
                 check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`sparsepo.train` on the tiny world, through the real deepspeed launcher when nproc > 1."""
    cmd = train_command(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                 f"logging.output_dir={run_dir}", "logging.progress=false", "logging.log_every=1",
                                 *overrides], nproc=nproc, resume=resume)
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of a TensorBoard scalar (last write wins, so a resumed run overrides)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*"),
                         key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out
