"""Shared pieces of the benchmark scripts: run `sparsepo.train` as a subprocess, read its figures."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "sparsepo" / "recipes" / "demo.yaml"


def world_at(path: str | Path):
    """The paths of a prepared demo world directory (`sparsepo demo prepare`), without loading anything."""
    from types import SimpleNamespace

    root = Path(path)
    return SimpleNamespace(root=root, sft_dir=root / "sft", train_path=root / "data" / "train.jsonl",
                           eval_prompts_path=root / "data" / "eval_prompts.jsonl")


def command(world, run_dir: Path, overrides: list[str], nproc: int, *, pin: bool = False) -> list[str]:
    """The command line of one training job on the demo world. `pin`: one core per process
    (1 process: `taskset -c 0`; more: the deepspeed launcher's --bind_cores_to_rank, numactl)."""
    from sparsepo.cli import train_command  # here: bench_trl's TRL worker imports this module without sparsepo

    cmd = train_command(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                 f"logging.output_dir={run_dir}", "logging.progress=false", "logging.overwrite=true",
                                 "checkpoint.at_end=false", *overrides], nproc=nproc)  # no checkpoint unless asked
    if not pin:
        return cmd
    return ["taskset", "-c", "0", *cmd] if nproc <= 1 else [*cmd[:3], "--bind_cores_to_rank", *cmd[3:]]


def train(world, run_dir: Path, overrides: list[str], nproc: int, *, pin: bool = False) -> float:
    """Run one training job (`command`); returns its wall time. Raises with the log tail on failure."""
    cmd = command(world, run_dir, overrides, nproc, pin=pin)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of `tag` ("train/step_time") from the run's metrics.jsonl (written whatever
    logging.report_to says; a resumed run's file holds one curve, so the last line of a step wins);
    {} for a run that logged nothing (a precompute)."""
    out: dict[int, float] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        row = json.loads(line)
        if tag in row:
            out[row["step"]] = row[tag]
    return out


def steady_mean(values: dict[int, float], skip: int = 3) -> float:
    """Mean over steps after the first `skip` (warm-up: allocator, first all-gathers)."""
    kept = [v for step, v in sorted(values.items()) if step > skip] or list(values.values())
    return mean(kept)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def write_report(path: Path, title: str, command: str, header: list[str], rows: list[list], notes: str,
                 data: dict) -> None:
    lines = [f"## {title}", "", f"Command: `{command}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n\n" + notes.strip() + "\n"
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(data, indent=1))
