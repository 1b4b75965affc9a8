"""A smaller model of the demo world, for SePO's weak-to-strong oracle (Yang et al. 2024, §4.4).

    from sparsepo.demo.small import prepare_small_sft
    small_dir = prepare_small_sft(world)   # <world>/sft-small: same tokenizer, 1/4 the width, SFT'd alike

The world's own SFT code (`demo.sft`) on the world's own corpus and tokenizer, at a smaller width,
so the oracle shares the policy's tokens (SePO scores the policy's tokens) and is ≥ 4× smaller.
Cached by the settings it was built with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from sparsepo.atomic import atomic_write
from sparsepo.demo.sft import build_model, encode_examples, train_sft
from sparsepo.demo.sizes import SIZES

SHRINK = 4
"""The small model's width is the policy's / SHRINK (default world: hidden 128 -> 32, ~8x fewer
parameters with the embeddings); the rest (layers, heads, SFT steps, batch, lr, corpus) is the world's."""
MANIFEST = "small.json"


def prepare_small_sft(world, *, force: bool = False, progress: bool = False) -> Path:
    """<world.root>/sft-small: the world's SFT recipe at 1/SHRINK of its width; returns its directory."""
    from transformers import AutoTokenizer

    meta = json.loads(Path(world.meta_path).read_text())
    settings = meta["settings"]
    out = Path(world.root) / "sft-small"
    policy = SIZES[settings["size"]]
    small = {"hidden_size": policy.hidden_size // SHRINK, "intermediate_size": policy.intermediate_size // SHRINK}
    want = {"world": meta["fingerprint"], **small}
    done = out / MANIFEST
    if not force and done.is_file() and {k: v for k, v in json.loads(done.read_text()).items() if k in want} == want:
        return out
    size = dataclasses.replace(policy, **small)
    tokenizer = AutoTokenizer.from_pretrained(str(world.tokenizer_dir))
    corpus = [json.loads(line) for line in (Path(world.train_path).parent / "sft_corpus.jsonl").read_text().splitlines()]
    examples = [(r["prompt"], r["response"]) for r in corpus]
    held = max(64, len(examples) // 20)  # the world SFT'd on all of it; hold the tail out here for a loss figure
    torch.manual_seed(settings["seed"])
    model = build_model(size, tokenizer)
    stats = train_sft(model, encode_examples(tokenizer, examples[:-held]), encode_examples(tokenizer, examples[-held:]),
                      size, pad_id=tokenizer.pad_token_id, seed=settings["seed"], progress=progress)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    atomic_write(done, json.dumps({**want, "n_params": n_params, "policy_n_params": meta["n_params"], **stats}, indent=1))
    return out
