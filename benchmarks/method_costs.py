"""What a method costs besides its step time: reference-cache bytes per pair (as stored and as raw
tensor payload), response tokens per pair, and FPO's policy-side extra work per micro-batch.
Used by bench_methods.py."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "sparsepo" / "recipes" / "demo.yaml"


def cache_stats(cache: Path) -> dict:
    index = json.loads((cache / "index.json").read_text())
    pairs = sum(len(s["example_ids"]) for s in index["shards"])
    total = sum(s["bytes"] for s in index["shards"])
    return {"pairs": pairs, "bytes": total, "bytes_per_pair": total / pairs, "shards": len(index["shards"]),
            "settings": json.loads(index["fingerprint"]["settings_detail"])}


def payload_bytes_per_pair(cache: Path) -> dict[str, float]:
    """Raw tensor bytes per pair by field (what the numbers need, without torch.save's framing)."""
    import torch

    index = json.loads((cache / "index.json").read_text())
    sums: dict[str, int] = {}
    n = 0
    for shard in index["shards"]:
        body = torch.load(cache / shard["file"], weights_only=True)
        for rec in body["records"]:
            n += 1
            for name, pair in rec.items():
                sums[name] = sums.get(name, 0) + sum(t.numel() * t.element_size() for t in pair)
    return {k: v / n for k, v in sums.items()}


def response_tokens_per_pair(cfg) -> float:
    """Mean chosen + rejected response tokens (incl. eos, after truncation) = response_mask count."""
    from sparsepo import data as pdata
    from sparsepo.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    ds, _ = pdata.load_preference_dataset(cfg.data, tokenizer)
    return sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])) / len(ds)


def fpo_policy_overhead(world, sae_dir: Path, *, layer: int, k: int, micro: int, reps: int) -> dict:
    """ms per micro-batch, single-threaded, plain torch (no DeepSpeed): policy forward + backward of
    the log-prob loss alone; + the layer hook, SAE encode + pooling and the feature MSE in the loss;
    and the extra reconstruction statistics FPO logs (a second encode + decode, no_grad)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsepo import data as pdata
    from sparsepo.config import load_config
    from sparsepo.sae.runtime import SAEFeatures
    from sparsepo.losses.common import pooled_union_mse
    from sparsepo.logprobs.head import PlainHead
    from sparsepo.models import load_tokenizer, pair_forward
    from sparsepo.sae import load_sae, reconstruction_stats

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}"])
    tokenizer = load_tokenizer(str(world.sft_dir))
    ds, _ = pdata.load_preference_dataset(cfg.data, tokenizer)
    batch = pdata.collate_pairs(pdata.gather_rows(ds, list(range(micro))), tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(world.sft_dir, dtype=torch.float32).train()
    sae = load_sae(str(sae_dir))
    feats = SAEFeatures(sae, layer=layer, k=k)
    with torch.no_grad(), feats.capture(model) as cap:
        pair_forward(PlainHead(model), batch)
        ref = feats.reference(cap, batch)

    def plain():
        fwd = pair_forward(PlainHead(model), batch)
        (fwd.seq_logps / batch.response_mask.sum(-1)).mean().backward()

    def with_features():
        with feats.capture(model) as cap:
            fwd = pair_forward(PlainHead(model), batch)
        from sparsepo.sae import pooled_features

        pooled = pooled_features(sae, cap.take(), batch.response_mask)
        mse, _ = pooled_union_mse(pooled, ref["feature_ids"], ref["feature_values"], k)
        ((fwd.seq_logps / batch.response_mask.sum(-1)).mean() + mse.mean()).backward()

    def stats_only():
        with torch.no_grad(), feats.capture(model) as cap:
            pair_forward(PlainHead(model), batch)
        hidden = cap.take()
        t = time.perf_counter()
        reconstruction_stats(sae, hidden, batch.response_mask)
        return time.perf_counter() - t

    def timed(fn):
        for _ in range(2):
            fn()
            model.zero_grad(set_to_none=True)
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        return statistics.median(out) * 1000

    base, feat = timed(plain), timed(with_features)
    stats_ms = statistics.median([stats_only() for _ in range(reps)]) * 1000
    return {"policy_fwd_bwd_ms": base, "with_sae_features_ms": feat, "sae_features_extra_ms": feat - base,
            "reconstruction_stats_ms": stats_ms, "micro_batch_pairs": micro,
            "response_tokens": int(batch.response_mask.sum()), "d_sae": int(sae.cfg.d_sae)}


def sae_k(sae_dir: Path):
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    return cfg.get("k")
