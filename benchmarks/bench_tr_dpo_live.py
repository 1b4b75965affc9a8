"""What TR-DPO costs in live mode: the sync (every rank mixes its slice; the first policy rank gathers
each parameter and streams it to the stages) and the step after it (the group waits for the weights,
so that step's reference scoring is not overlapped), next to the same live run with a frozen
reference and to inline TR-DPO. Runs interleaved (frozen, live TR-DPO, inline TR-DPO, ...).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_tr_dpo_live.py --world runs/demo/world --repeats 2

DPO on the demo's model widened to a 128k vocabulary (33 M parameters), 2 policy ranks (ZeRO-3) and,
in live mode, a 2-stage reference group — 4 processes on this machine's cores; a sync every
`--sync-steps` steps. Per run: the sync's seconds (from the run's log), the median step time, and the
median time the policy waited for the reference (`ref_wait`) on the steps right after a sync and on
the others. Writes docs/bench_tr_dpo_live.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench_lora import widened_model
from common import REPO, command, scalars, world_at

LIVE = ["reference.mode=live", "topology.reference_ranks=2", "topology.pipeline_stages=2"]


def settings(sync_steps: int) -> dict[str, tuple[list[str], int]]:
    follow = ["reference.sync_alpha=0.6", f"reference.sync_steps={sync_steps}"]
    return {"live, frozen reference": (LIVE, 4), "live, TR-DPO": (LIVE + follow, 4),
            "inline, TR-DPO": (["reference.mode=inline", *follow], 2)}


def one_run(world, run: Path, overrides: list[str], nproc: int, sync_steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    cmd = command(world, run, overrides, nproc)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    syncs = [float(x) for x in re.findall(r"TR-DPO: step \d+: the reference followed the policy in ([\d.]+) s", proc.stderr + proc.stdout)]
    step, wait = scalars(run, "train/step_time"), scalars(run, "train/ref_wait")
    after = [s for s in step if s > 1 and (s - 1) % sync_steps == 0]  # the first step after each sync
    others = [s for s in step if s > 1 and s not in after]
    med = lambda d, keys: statistics.median(d[k] for k in keys) if keys else None  # noqa: E731
    return {"sync_s": syncs, "step_s": med(step, [s for s in step if s > 1]), "step_after_sync_s": med(step, after),
            "ref_wait_after_sync_s": med(wait, after), "ref_wait_other_s": med(wait, others)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="runs/demo/world")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--sync-steps", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", default=str(REPO / "docs" / "bench_tr_dpo_live.json"))
    args = p.parse_args(argv)
    world = world_at(args.world)
    got: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-trdpo-") as tmp:
        model = widened_model(world, Path(tmp) / "model", args.vocab)
        base = [f"model.path={model}", f"model.tokenizer={world.sft_dir}", "method.name=dpo", "train.micro_batch_size=4",
                f"train.max_steps={args.steps}", "logging.log_every=1", "optim.warmup_steps=0"]
        for i in range(args.repeats):
            for name, (extra, nproc) in settings(args.sync_steps).items():
                r = one_run(world, Path(tmp) / f"{i}-{name.replace(' ', '').replace(',', '-')}", [*base, *extra], nproc,
                            args.sync_steps)
                got.setdefault(name, []).append(r)
                print(f"{name} #{i}: {json.dumps({k: v if not isinstance(v, float) else round(v, 3) for k, v in r.items()})}",
                      flush=True)
    pick = lambda runs, key: statistics.median(v for r in runs for v in ([r[key]] if not isinstance(r[key], list) else r[key])  # noqa: E731
                                               if v is not None) if any(r[key] for r in runs) else None
    table = {n: {k: pick(runs, k) for k in runs[0]} for n, runs in got.items()}
    Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": got, "table": table}, indent=1))
    print("| run | sync s | step s | step after a sync s | ref wait after a sync s | ref wait otherwise s |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for n, t in table.items():
        print(f"| {n} | {fmt(t['sync_s'])} | {fmt(t['step_s'])} | {fmt(t['step_after_sync_s'])} | "
              f"{fmt(t['ref_wait_after_sync_s'])} | {fmt(t['ref_wait_other_s'])} |")


if __name__ == "__main__":
    main()
