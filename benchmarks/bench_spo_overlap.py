"""SPO with live, overlapped reference scoring against the synchronous inline run.

    .venv/bin/python benchmarks/bench_spo_overlap.py --size default --steps 30 --staleness 0 1 2 --repeats 3

(`--staleness 0` adds the synchronous live run: the reference on its own core but not overlapped, which
separates "the reference moved off the policy's core" from "its scoring overlaps the policy's step".)

Inline (the sequential baseline): 1 process on 1 core; each step samples, has the frozen reference on
the same rank score the samples, then trains. Live s: 1 policy rank + 1 reference rank
(topology.reference_ranks=1), one core each; the policy sends round t's samples as a REQUEST and
trains on round t−s, so the reference scores while the policy works. Processes are pinned one core
each (`taskset -c 0` for inline, the deepspeed launcher's `--bind_cores_to_rank` (numactl) for live)
unless --no-pin. Runs are interleaved (repeat-major) so a noisy neighbour hurts every mode alike.

Per run: steady-state means (steps after the first 3) of train/step_time and train/sample_ref_wait
(the policy's wait for the reference's scores: inline it is the reference's whole scoring time).
Per mode: medians over the repeats. Figures:
  ratio          = live step ÷ inline step (target ≤ 0.8)
  hidden         = 1 − live wait ÷ inline reference time (the share of the reference's time the
                   policy no longer waits for)
Writes --json (default docs/bench_spo_overlap.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from common import REPO, scalars, steady_mean, train


def run_mode(world, run: Path, overrides: list[str], *, nproc: int, pin: bool) -> dict:
    wall = train(world, run, overrides, nproc, pin=pin)
    return {"step_time_s": steady_mean(scalars(run, "train/step_time")),
            "ref_wait_s": steady_mean(scalars(run, "train/sample_ref_wait")),
            "gen_time_s": steady_mean(scalars(run, "train/gen_time")),
            "staleness": max(scalars(run, "train/staleness").values()), "wall_s": wall}


def figures(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per mode: medians over repeats, and the live modes' ratio and hidden fraction against inline."""
    med = {m: {k: median(r[k] for r in rs) for k in ("step_time_s", "ref_wait_s", "gen_time_s")}
           for m, rs in runs.items()}
    base = med["inline"]
    for m, f in med.items():
        f["ratio_to_inline"] = f["step_time_s"] / base["step_time_s"]
        f["hidden_fraction"] = None if m == "inline" else 1 - f["ref_wait_s"] / base["ref_wait_s"]
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["default", "tiny"], help="demo world size")
    p.add_argument("--world", help="an existing demo world directory (default: built in --workdir)")
    p.add_argument("--workdir", help="where runs go (default: a temporary directory, removed)")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    p.add_argument("--micro", type=int, default=8, help="pairs (= prompts sampled) per step")
    p.add_argument("--max-new-tokens", type=int, default=32, help="sample length budget")
    p.add_argument("--staleness", type=int, nargs="+", default=[1, 2], help="live modes' staleness s")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every mode")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--json", default=str(REPO / "docs" / "bench_spo_overlap.json"))
    a = p.parse_args()
    from sparsepo.demo import prepare_world

    work = Path(a.workdir or tempfile.mkdtemp(prefix="sparsepo-spo-overlap-"))
    world = prepare_world(Path(a.world or work / "world"), size=a.size, progress=False)
    pin = not a.no_pin and shutil.which("taskset") is not None and shutil.which("numactl") is not None
    base = ["method.name=spo", f"train.micro_batch_size={a.micro}", "train.grad_accum=1", f"train.max_steps={a.steps}",
            f"generation.max_new_tokens={a.max_new_tokens}", "checkpoint.every_steps=0"]
    modes = {"inline": (["reference.mode=inline"], 1)}
    modes |= {f"live s={s}": (["reference.mode=live", "topology.reference_ranks=1", "topology.pipeline_stages=1",
                               f"generation.staleness={s}", f"reference.window={s + 1}"], 2) for s in a.staleness}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(a.repeats):
        for m, (extra, nproc) in modes.items():
            runs[m].append(run_mode(world, work / f"r{rep}-{m.replace(' ', '').replace('=', '')}", base + extra,
                                    nproc=nproc, pin=pin))
            print(f"repeat {rep} {m}: step {runs[m][-1]['step_time_s'] * 1000:.1f} ms, reference wait "
                  f"{runs[m][-1]['ref_wait_s'] * 1000:.1f} ms", flush=True)
    med = figures(runs)
    print(f"\nSPO step, live overlapped scoring vs inline (demo world {a.size}, {a.steps} steps, micro {a.micro}, "
          f"{a.max_new_tokens} new tokens, {a.repeats} repeats, medians, pinned: {pin})")
    print("| mode | processes | step (ms) | reference wait (ms) | generation (ms) | ÷ inline step | hidden |")
    print("|---|---|---|---|---|---|---|")
    for m, f in med.items():
        hidden = "—" if f["hidden_fraction"] is None else f"{f['hidden_fraction']:.0%}"
        print(f"| {m} | {modes[m][1]} | {f['step_time_s'] * 1000:.1f} | {f['ref_wait_s'] * 1000:.1f} | "
              f"{f['gen_time_s'] * 1000:.1f} | {f['ratio_to_inline']:.2f} | {hidden} |")
    out = {"command": "python benchmarks/bench_spo_overlap.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared",
           "size": a.size, "steps": a.steps, "micro": a.micro, "max_new_tokens": a.max_new_tokens,
           "repeats": a.repeats, "pinned": pin, "medians": med, "runs": runs}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
