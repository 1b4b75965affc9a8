"""Quality of LoRA (r=8, r=16) vs full fine-tuning on the demo, over several seeds: win rate vs the
SFT model under the demo's ground-truth reward and KL(policy‖SFT) per sequence.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_lora_quality.py --world runs/demo/world --seeds 0,1,2 --steps 120

DPO (demo recipe, β 0.1, cache reference) for --steps steps per run, one process each, seed-major
interleaving (full, r=8, r=16 for seed 0, then seed 1, ...). LoRA's learning rate is --lora-lr-scale
× the recipe's (adapters start at zero and need larger steps; 10× is the usual rule of thumb). Each
final policy (final/: the adapters merged) is scored by `sparsepo.demo.evaluate_policy` with the
evaluation sampler seeded by the run's seed. Table: mean ± standard error over seeds.
Writes docs/bench_lora_quality.json and prints the table for docs/lora.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from common import REPO, train, world_at

RECIPE_LR = 5e-4  # sparsepo/recipes/demo.yaml's optim.lr


def settings(scale: float) -> dict[str, list[str]]:
    lora_lr = f"optim.lr={RECIPE_LR * scale:g}"
    return {"full": [], "lora r=8": ["lora.r=8", "lora.alpha=16", lora_lr],
            "lora r=16": ["lora.r=16", "lora.alpha=32", lora_lr]}


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {se:.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lora-lr-scale", type=float, default=10.0)
    p.add_argument("--out", default=str(REPO / "docs" / "bench_lora_quality.json"))
    a = p.parse_args(argv)
    from sparsepo.demo import evaluate_policy

    world = world_at(a.world)
    prompts = world.eval_prompts_path
    work = Path(tempfile.mkdtemp(prefix="sparsepo-bench-lora-q-"))
    runs = settings(a.lora_lr_scale)
    got = {s: {"win_rate": [], "kl": []} for s in runs}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for setting, extra in runs.items():
            run = work / f"{setting.replace(' ', '').replace('=', '')}-seed{seed}"
            train(world, run, ["method.name=dpo", f"train.max_steps={a.steps}", f"train.seed={seed}",
                               f"reference.cache_dir={work / 'ref_cache'}", *extra], 1)
            stats = evaluate_policy(run / "final", world.sft_dir, prompts, seed=seed, progress=False)
            got[setting]["win_rate"].append(stats["win_rate"])
            got[setting]["kl"].append(stats["kl"])
            print(f"seed {seed} {setting}: win rate {stats['win_rate']:.3f}, KL {stats['kl']:.3f}", flush=True)
    table = ["| setting | win rate vs SFT | KL(policy‖SFT) per sequence |", "|---|---|---|"]
    table += [f"| {s} | {mean_se(g['win_rate'])} | {mean_se(g['kl'])} |" for s, g in got.items()]
    Path(a.out).write_text(json.dumps({"seeds": a.seeds, "steps": a.steps, "lora_lr_scale": a.lora_lr_scale,
                                       "results": got}, indent=1))
    print("\n".join(table))


if __name__ == "__main__":
    main()
