"""Policy step time, tokens/s and peak RSS per rank on the demo config, 1 and 2 processes, and the
time to prepare the demo world.

    .venv/bin/python benchmarks/bench_train.py [--size default|tiny] [--steps 40]

Writes docs/bench_train.md (+ .json). CPU figures on this project's 2-core machines are noisy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import REPO, scalars, steady_mean, summary, train, write_report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="default", choices=["default", "tiny"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--world", default=None, help="an existing demo world (default: a fresh one, its preparation timed)")
    p.add_argument("--out", default=str(REPO / "docs" / "bench_train.md"))
    a = p.parse_args(argv)
    from sparsepo.demo import prepare_world

    work = Path(tempfile.mkdtemp(prefix="sparsepo-bench-"))
    t0 = time.perf_counter()
    world = prepare_world(Path(a.world) if a.world else work / "world", size=a.size, progress=False, force=not a.world)
    prepare_s = time.perf_counter() - t0
    rows, data = [], {"size": a.size, "prepare_world_s": prepare_s, "runs": {}}
    for nproc in (1, 2):
        run = work / f"run-{nproc}"
        wall = train(world, run, ["method.name=dpo", f"train.micro_batch_size={a.global_batch // nproc}",
                                  f"train.max_steps={a.steps}"], nproc)
        step = steady_mean(scalars(run, "train/step_time"))
        tps = steady_mean(scalars(run, "train/tokens_per_s"))
        rss = summary(run)["peak_rss_mib_per_rank"]
        data["runs"][nproc] = {"step_time_s": step, "tokens_per_s": tps, "peak_rss_mib_per_rank": rss,
                               "wall_s": wall}
        rows.append([nproc, f"{step * 1000:.1f}", f"{tps:.0f}", ", ".join(f"{r:.0f}" for r in rss), f"{wall:.1f}"])
    write_report(Path(a.out), f"Training throughput, demo world ({a.size}), DPO, ZeRO-3, CPU",
                 f"python benchmarks/bench_train.py --size {a.size} --steps {a.steps}",
                 ["processes", "policy step (ms)", "tokens/s", "peak RSS per rank (MiB)", "job wall (s)"], rows,
                 f"Global batch {a.global_batch} pairs; steady-state means exclude the first 3 steps. "
                 f"Demo world prepared (tokenizer + SFT + pairs) in {prepare_s:.1f} s.", data)


if __name__ == "__main__":
    main()
