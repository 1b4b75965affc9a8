"""Peak RSS and step time of LoRA vs full fine-tuning, through the real trainer, on the demo world and
on the demo's model widened to a 128k vocabulary; runs interleaved (full, r=8, r=16, full, ...) so the
shared machine's load falls on every setting alike; medians and ratios reported.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_lora.py --world runs/demo/world --repeats 3 --steps 20

Each run is one process (`sparsepo.train`, ZeRO-3 on 1 rank, DPO, inline reference: LoRA's reference
is the policy with its adapters off, full fine-tuning loads a second, frozen copy); its peak RSS is
summary.json's `peak_rss_mib_per_rank`, its step time the median of train/step_time after 3 warm-up
steps. The 128k model: the demo SFT model's config with vocab_size=128256 (random weights; the
demo tokenizer's ids are a subset), hidden and layers unchanged, so the embedding and head dominate
the parameter count as they do in Llama-3-8B's optimiser state only at a smaller scale.
Writes docs/bench_lora.json and prints the table for docs/lora.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import REPO, scalars, summary, train, world_at

SETTINGS = {"full": [], "lora r=8": ["lora.r=8", "lora.alpha=16"], "lora r=16": ["lora.r=16", "lora.alpha=32"]}


def widened_model(world, out: Path, vocab: int) -> Path:
    """The demo SFT model's architecture at `vocab` tokens, random weights (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(world.sft_dir)
    config.vocab_size = vocab
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def measure(world, work: Path, name: str, overrides: list[str], repeats: int, settings: dict = SETTINGS) -> dict:
    """setting -> {"step_s": [...], "rss_mib": [...], "trainable": n, "total": n}, runs interleaved."""
    got = {s: {"step_s": [], "rss_mib": []} for s in settings}
    for i in range(repeats):
        for setting, extra in settings.items():
            run = work / f"{name}-{setting.replace(' ', '').replace('=', '')}-{i}"
            train(world, run, [*overrides, *extra], 1)
            step = scalars(run, "train/step_time")
            got[setting]["step_s"].append(statistics.median(v for s, v in step.items() if s > 3))
            got[setting]["rss_mib"].append(summary(run)["peak_rss_mib_per_rank"][0])
            print(f"{name} {setting} #{i}: step {got[setting]['step_s'][-1] * 1e3:.1f} ms, "
                  f"peak RSS {got[setting]['rss_mib'][-1]:.0f} MiB", flush=True)
    return got


def counts(model_dir: Path, settings: dict = SETTINGS) -> dict:
    """setting -> (trainable, total) parameters of the unquantised model, as the trainer counts them
    (sparsepo.lora.parameter_counts)."""
    from transformers import AutoModelForCausalLM

    from sparsepo import lora
    from sparsepo.config.lora import LoraConfig

    out = {"full": (sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()),) * 2}
    for setting, extra in settings.items():
        if extra:
            r = int(extra[0].split("=")[1])
            out[setting] = lora.parameter_counts(lora.wrap(AutoModelForCausalLM.from_pretrained(model_dir),
                                                           LoraConfig(r=r, alpha=2.0 * r)))
    return out


def rows(name: str, got: dict, params: dict) -> list[str]:
    full_step = statistics.median(got["full"]["step_s"])
    full_rss = statistics.median(got["full"]["rss_mib"])
    out = []
    for setting, g in got.items():
        step, rss = statistics.median(g["step_s"]), statistics.median(g["rss_mib"])
        out.append(f"| {name} | {setting} | {params[setting][0]:,} of {params[setting][1]:,} | {step * 1e3:.1f} | "
                   f"{step / full_step:.2f} | {rss:.0f} | {rss / full_rss:.2f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", required=True, help="a prepared demo world (sparsepo demo / prepare_world)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", default=str(REPO / "docs" / "bench_lora.json"))
    a = p.parse_args(argv)
    world = world_at(a.world)
    work = Path(tempfile.mkdtemp(prefix="sparsepo-bench-lora-"))
    common = ["method.name=dpo", "reference.mode=inline", "train.micro_batch_size=8", f"train.max_steps={a.steps}",
              "optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.keep_last=1"]
    results = {"demo": measure(world, work, "demo", common, a.repeats)}
    big = widened_model(world, work / "model-128k", a.vocab)
    results[f"vocab {a.vocab}"] = measure(world, work, "v128k", [*common, f"model.path={big}",
                                                                 f"model.tokenizer={world.sft_dir}"], a.repeats)
    params = {"demo": counts(world.sft_dir), f"vocab {a.vocab}": counts(big)}
    table = ["| model | setting | trainable of total parameters | step ms (median) | × full | peak RSS MiB (median) "
             "| × full |", "|---|---|---|---|---|---|---|"]
    for name, got in results.items():
        table += rows(name, got, params[name])
    Path(a.out).write_text(json.dumps({"repeats": a.repeats, "steps": a.steps, "results": results,
                                       "parameters": params}, indent=1))
    print("\n".join(table))


if __name__ == "__main__":
    main()
