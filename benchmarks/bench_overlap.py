"""Overlap of the live reference group, measured so the ratio means something on a small CPU box.

    .venv/bin/python benchmarks/bench_overlap.py [--size default] [--steps 100] [--repeats 3] [--window 4]

One core per process, so the two roles cannot steal each other's CPU (on 2 shared cores, 2 policy +
2 reference processes measured the OS scheduler, not ours: live ÷ cache swung 0.78–2.03 between
runs). Three modes of the same DPO run, interleaved `--repeats` times (cache, inline, live, cache,
inline, live, …):

* cache: 1 policy rank pinned to core 0 (`taskset`), reference log-probs read from the cache;
* inline: 1 policy rank pinned to core 0, the frozen reference scoring each batch on the same rank
  (the sequential baseline, as TRL does it); its `train/ref_wait` is the reference's own time;
* live: 1 policy rank + 1 reference rank (a 1-stage "pipeline"), one core each (the deepspeed
  launcher's `--bind_cores_to_rank`, numactl), the reference walking `reference.window` batches ahead.

Reported per mode: median over repeats of the steady-state mean step time (steps after the 3rd), and
the reference wait per step. Figures: live ÷ cache (target ≤ 1.10: the reference is off the policy's
critical path), live ÷ inline, and the **hidden fraction** of the reference's time,
1 − (live wait per step ÷ inline reference time per step). Writes docs/bench_overlap.md (+ .json).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, scalars, steady_mean, train, write_report

LIVE = ["reference.mode=live", "topology.reference_ranks=1", "topology.pipeline_stages=1"]
MODES = {"cache": (["reference.mode=cache"], 1), "inline": (["reference.mode=inline"], 1), "live": (LIVE, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default", choices=["default", "tiny"])
    p.add_argument("--world", default=None, help="an existing demo world directory (default: a fresh one)")
    p.add_argument("--workdir", default=None, help="run directories (default: a temporary directory)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=4, help="reference.window of the live mode")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--out", default=str(REPO / "docs" / "bench_overlap.md"))
    a = p.parse_args(argv)
    from sparsepo.demo import prepare_world

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="sparsepo-overlap-"))
    world = prepare_world(Path(a.world) if a.world else work / "world", size=a.size, progress=False)
    base = ["method.name=dpo", f"train.micro_batch_size={a.micro}", "train.grad_accum=1",
            f"train.max_steps={a.steps}", f"reference.window={a.window}", f"reference.cache_dir={work / 'ref_cache'}"]
    train(world, work / "precompute", [*base, "reference.mode=precompute"], 1)  # cache filled before timing
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    t0 = time.perf_counter()
    for r in range(a.repeats):
        for mode, (extra, nproc) in MODES.items():
            run = work / f"{mode}-{r}"
            train(world, run, [*base, *extra], nproc, pin=not a.no_pin)
            runs[mode].append({"step_time_s": steady_mean(scalars(run, "train/step_time")),
                               "ref_wait_s": steady_mean(scalars(run, "train/ref_wait"))})
    med = {m: {k: statistics.median(x[k] for x in v) for k in ("step_time_s", "ref_wait_s")} for m, v in runs.items()}
    inline_ref = med["inline"]["ref_wait_s"]
    res = {"size": a.size, "steps": a.steps, "micro": a.micro, "repeats": a.repeats, "window": a.window,
           "pinned": not a.no_pin, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs,
           "median": med, "live_over_cache": med["live"]["step_time_s"] / med["cache"]["step_time_s"],
           "live_over_cache_per_repeat": [lv["step_time_s"] / c["step_time_s"]
                                          for lv, c in zip(runs["live"], runs["cache"])],
           "live_over_inline": med["live"]["step_time_s"] / med["inline"]["step_time_s"],
           "hidden_fraction": 1 - med["live"]["ref_wait_s"] / inline_ref if inline_ref > 0 else None,
           "total_s": time.perf_counter() - t0}
    rows = [[m, f"{s['step_time_s'] * 1000:.1f}", f"{s['ref_wait_s'] * 1000:.2f}",
             f"{s['step_time_s'] / med['cache']['step_time_s']:.2f}",
             ", ".join(f"{x['step_time_s'] * 1000:.1f}" for x in runs[m])] for m, s in med.items()]
    hidden = "–" if res["hidden_fraction"] is None else f"{res['hidden_fraction']:.3f}"
    write_report(Path(a.out), f"Reference overlap, demo world ({a.size}), DPO, one core per process",
                 "python benchmarks/bench_overlap.py " + " ".join(argv if argv is not None else
                                                                 __import__("sys").argv[1:]),
                 ["mode", "policy step (ms, median)", "ref wait per step (ms)", "÷ cache step", "per repeat (ms)"],
                 rows,
                 f"Measured {res['date']}; {a.repeats} interleaved repeats of {a.steps} steps, micro-batch "
                 f"{a.micro}, live window {a.window}; processes {'pinned one per core' if res['pinned'] else 'unpinned'}. "
                 f"**live ÷ cache = {res['live_over_cache']:.2f}** (target ≤ 1.10; per repeat "
                 + ", ".join(f"{x:.2f}" for x in res["live_over_cache_per_repeat"]) + "), live ÷ inline = "
                 f"{res['live_over_inline']:.2f}, hidden fraction of the reference's time = **{hidden}** "
                 "(1 − live wait ÷ inline reference time). Steady-state means exclude the first 3 steps.", res)
    return res


if __name__ == "__main__":
    main()
