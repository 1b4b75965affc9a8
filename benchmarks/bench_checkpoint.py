"""How long a checkpoint stops training: synchronous writes vs `checkpoint.async_write` (DeepSpeed's
decoupled writer process), through the real trainer, runs interleaved (sync, async, sync, ...).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_checkpoint.py --world runs/demo/world --repeats 3 --steps 10 --every 3

One process (ZeRO-3 on 1 rank, DPO, cache reference) on the demo's model widened to a 128k vocabulary
(33 M parameters: each checkpoint holds fp32 weights and two Adam moments, ~0.5 GB), a checkpoint every
`--every` steps. Blocking time per checkpoint, from the run's log: synchronous = "written and sealed in
X s"; async = "handed to the writer in X s" + "sealed in Y s" (the seal, after the next step, hashes the
files). The step after a checkpoint shares the CPU with the writer on a CPU-only machine; on a GPU the
writer's host work overlaps device compute. Writes docs/bench_checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_lora import widened_model
from common import REPO, command, scalars, world_at

SETTINGS = {"sync": [], "async": ["checkpoint.async_write=true"]}


def blocking_s(log: str) -> list[float]:
    """Seconds each mid-run checkpoint held the training loop, in order (the last step's checkpoint is
    waited for in both settings and left out)."""
    waited = [float(x) for x in re.findall(r"written and sealed in ([\d.]+) s", log)][:-1]
    handed = [float(x) for x in re.findall(r"handed to the writer in ([\d.]+) s", log)]
    sealed = [float(x) for x in re.findall(r": sealed in ([\d.]+) s", log)]
    return waited + [h + s for h, s in zip(handed, sealed)]


def one_run(world, run: Path, overrides: list[str]) -> dict:
    cmd = command(world, run, overrides, 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    log = proc.stdout + proc.stderr
    steps = scalars(run, "train/step_time")
    return {"wall_s": wall, "blocking_s": blocking_s(log), "step_s": statistics.median(steps.values())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="runs/demo/world")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", default=str(REPO / "docs" / "bench_checkpoint.json"))
    args = p.parse_args(argv)
    world = world_at(args.world)
    got = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        model = widened_model(world, Path(tmp) / "model", args.vocab)
        base = [f"model.path={model}", f"model.tokenizer={world.sft_dir}", "checkpoint.at_end=true", "method.name=dpo", f"train.max_steps={args.steps}",
                f"checkpoint.every_steps={args.every}", "checkpoint.keep_last=1", "logging.log_every=1"]
        for i in range(args.repeats):
            for setting, extra in SETTINGS.items():
                r = one_run(world, Path(tmp) / f"{setting}-{i}", [*base, *extra])
                got[setting].append(r)
                print(f"{setting} #{i}: wall {r['wall_s']:.1f} s, blocking per checkpoint "
                      f"{[round(b, 2) for b in r['blocking_s']]} s, step {r['step_s'] * 1e3:.0f} ms", flush=True)
    table = {s: {"blocking_s_median": statistics.median(b for r in runs for b in r["blocking_s"]),
                 "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                 "step_s_median": statistics.median(r["step_s"] for r in runs)} for s, runs in got.items()}
    Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": got, "table": table}, indent=1))
    print("| setting | blocking s per mid-run checkpoint (median) | run wall s (median) | step ms (median) |")
    print("|---|---|---|---|")
    for s, t in table.items():
        print(f"| {s} | {t['blocking_s_median']:.2f} | {t['wall_s_median']:.1f} | {t['step_s_median'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
