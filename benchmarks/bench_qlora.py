"""Peak RSS and step time of QLoRA vs LoRA vs full fine-tuning through the real trainer, on a model whose
decoder linear layers hold most of the weights (the demo SFT model's config widened: hidden 1024,
intermediate 2816, 4 layers, 16 heads; random weights), where 4-bit storage of the base matters; runs
interleaved, medians reported.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_qlora.py --world runs/demo/world --repeats 2 --steps 8

Each run: one process, ZeRO-3 on 1 rank, DPO, inline reference (full fine-tuning loads a second, frozen
copy; LoRA and QLoRA use the adapters-off policy), fp32 compute (QLoRA's layers dequantise to fp32),
micro-batch 8. Writes docs/bench_qlora.json and prints the table for docs/lora.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_lora import counts, measure, rows
from common import REPO, world_at

SETTINGS = {"full": [], "lora r=16": ["lora.r=16", "lora.alpha=32"],
            "qlora r=16": ["lora.r=16", "lora.alpha=32", "lora.load_in_4bit=true"]}
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
         "num_key_value_heads": 16, "head_dim": 64}


def decoder_heavy_model(world, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(world.sft_dir)
    for key, value in SHAPE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", required=True, help="a prepared demo world (sparsepo demo / prepare_world)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "docs" / "bench_qlora.json"))
    a = p.parse_args(argv)
    world = world_at(a.world)
    work = Path(tempfile.mkdtemp(prefix="sparsepo-bench-qlora-"))
    model = decoder_heavy_model(world, work / "model")
    common = ["method.name=dpo", "reference.mode=inline", "train.micro_batch_size=8", f"train.max_steps={a.steps}",
              "optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.at_end=false",
              f"model.path={model}", f"model.tokenizer={world.sft_dir}"]
    got = measure(world, work, "wide", common, a.repeats, SETTINGS)
    params = counts(model, {k: v for k, v in SETTINGS.items() if "lora.load_in_4bit=true" not in v})
    params["qlora r=16"] = params["lora r=16"]
    table = ["| model | setting | trainable of total parameters | step ms (median) | × full | peak RSS MiB (median) "
             "| × full |", "|---|---|---|---|---|---|---|"]
    table += rows("wide", got, params)
    Path(a.out).write_text(json.dumps({"repeats": a.repeats, "steps": a.steps, "shape": SHAPE, "results": got,
                                       "parameters": params}, indent=1))
    print("\n".join(table))


if __name__ == "__main__":
    main()
