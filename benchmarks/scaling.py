"""Scaling on paper: how many reference GPUs keep the live overlap ≤ 1.10 for a policy on 8–64 nodes.

    python benchmarks/scaling.py [--overlap docs/bench_overlap.json] [--methods docs/benchmarks_methods.json]

A model, not a measurement: it combines the per-component costs measured here (the inline reference
forward's share of a policy step, from bench_overlap.py; reference bytes per pair, from
bench_methods.py) with stated assumptions about a GPU cluster, and writes docs/scaling.md.

The model. A policy step on P GPUs (ZeRO-3, forward + backward of chosen and rejected) costs
≈ 6·N·T FLOPs per pair, the reference's forward ≈ 2·N_ref·T; the live group keeps pace when its
time per global batch is within the policy's, so the policy waits at most the excess. With the
policy at MFU_train and the reference pipeline at MFU_ref, its S stages idle for the fill/drain
bubble of (S − 1) of every m + S − 1 micro-batch slots, and an allowed overlap of 1.10 (the policy
may wait 10% of its step):

    R ≥ P · (2·N_ref / 6·N) · (MFU_train / MFU_ref) · (1 + (S − 1)/m) / 1.10

rounded up to whole pipelines of S stages, S = the fewest stages whose GPUs hold the reference's
bf16 weights with 25% headroom for activations. The measured CPU share (inline reference time ÷
the policy's cache-mode step) is printed beside the FLOP ratio 2/6 as a check of the model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_MEM_GB, GPUS_PER_NODE = 80.0, 8
MFU_TRAIN, MFU_REF, MICRO = 0.40, 0.50, 8
SLACK = 1.10
POLICIES = {"1B": 1e9, "8B": 8e9, "70B": 70e9}
NODES = (8, 16, 32, 64)


def stages_for(n_params: float) -> int:
    """Fewest pipeline stages whose GPUs hold n_params bf16 weights with 25% headroom."""
    return max(1, math.ceil(2 * n_params * 1.25 / (GPU_MEM_GB * 1e9)))


def reference_gpus(policy_gpus: int, n_policy: float, n_ref: float, share: float | None = None) -> tuple[int, int]:
    """(reference GPUs, stages) keeping the overlap ≤ SLACK; `share` overrides the FLOP model's
    reference-to-policy time ratio (2·N_ref / 6·N · MFU_train / MFU_ref)."""
    s = stages_for(n_ref)
    ratio = share if share is not None else (2 * n_ref) / (6 * n_policy) * MFU_TRAIN / MFU_REF
    need = policy_gpus * ratio * (1 + (s - 1) / MICRO) / SLACK
    return max(s, math.ceil(need / s) * s), s


def render(measured_share: float | None, overlap: dict | None, bytes_per_pair: dict[str, float]) -> str:
    flop_share = 2 / 6 * MFU_TRAIN / MFU_REF
    lines = ["# Scaling on paper", "", "Command: `python benchmarks/scaling.py` (regenerates this file from the "
             "measured JSONs). A model, not a measurement; the assumptions are listed below.", "",
             "## Inputs", "",
             f"- Reference-to-policy time ratio of the FLOP model: 2/6 × MFU_train {MFU_TRAIN} / MFU_ref {MFU_REF} "
             f"= **{flop_share:.3f}**."]
    if measured_share is not None:
        lines.append(f"- Measured on this CPU (`bench_overlap.py`, {overlap['date']}, {overlap['size']} world, "
                     f"micro-batch {overlap['micro']}): the inline reference forward takes "
                     f"**{measured_share:.3f}** of a cache-mode policy step — below 2/6 because a CPU step also "
                     "pays optimiser, ZeRO-3 bookkeeping and collation, which the reference does not.")
    if bytes_per_pair:
        lines.append("- Reference outputs per pair as stored in the cache (measured, `bench_methods.py`): "
                     + ", ".join(f"{m} {b:,.0f} B" for m, b in bytes_per_pair.items())
                     + ". The bridge carries the same payload per batch.")
    lines += ["", "## Reference GPUs for an overlap ≤ 1.10 (reference = policy size: DPO, FPO, TDPO)", "",
              "| policy | stages S | " + " | ".join(f"{n} nodes ({n * GPUS_PER_NODE} GPUs)" for n in NODES) + " |",
              "|---|---|" + "---|" * len(NODES)]
    shares = [("FLOP model", None)] + ([("measured CPU share", measured_share)] if measured_share else [])
    for label, share in shares:
        for name, n in POLICIES.items():
            cells = []
            for nodes in NODES:
                p = nodes * GPUS_PER_NODE
                r, _ = reference_gpus(p, n, n, share)
                cells.append(f"{r} ({r / p:.0%}, {math.ceil(r / GPUS_PER_NODE)} nodes)")
            lines.append(f"| {name}, {label} | {stages_for(n)} | " + " | ".join(cells) + " |")
    lines += ["", "The ratio, not the model size, sets the share: with the reference as large as the policy, about "
              "a quarter to a third of the policy's GPUs (more for references that need several stages, whose "
              "pipeline bubble costs throughput). SePO's oracle pair (two forwards of an oracle 16× smaller than "
              "the policy, the paper's 410M → 6.9B ratio) needs "
              f"{reference_gpus(64 * GPUS_PER_NODE, 8e9, 2 * 8e9 / 16)[0]} reference GPUs for a policy on 64 nodes.",
              ""]
    per_batch = {m: b * 512 / 1e6 for m, b in bytes_per_pair.items()}
    if per_batch:
        lines += ["## The bridge", "", "At a global batch of 512 pairs the bridge carries "
                  + ", ".join(f"{m} {v:.2f} MB" for m, v in per_batch.items())
                  + " per step — under a millisecond on a 25 GB/s inter-node link, against policy steps of "
                  "seconds at these sizes: the bridge never limits the overlap; the reference's compute does.", ""]
    lines += ["## Assumptions", "",
              f"- {GPUS_PER_NODE} GPUs of {GPU_MEM_GB:.0f} GB per node; bf16 weights; the reference held in a "
              "pipeline of S stages, replicated R/S times; policy and reference see the same tokens per pair.",
              f"- MFU {MFU_TRAIN} for the ZeRO-3 policy step (forward + backward + gathers), {MFU_REF} for the "
              f"reference's forward-only pipeline at {MICRO} micro-batches per batch (bubble (S−1)/{MICRO}).",
              "- The live group walks `reference.window` ≥ S batches ahead, so its latency is hidden and only "
              "its throughput matters; the cache mode needs no reference GPUs during training at all (its "
              "precompute costs the same FLOPs once, before).",
              "- SPO adds generation on the policy ranks (not modelled) and scores samples on request: its "
              "reference cost per sample is that of a pair's response, so the same table applies per sample.",
              "- Not measured on GPUs: no GPU was lent to the sessions that wrote this; `benchmarks/gpu_bench.sh` "
              "measures the overlap ratio on one when available.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overlap", default=str(REPO / "docs" / "bench_overlap.json"))
    p.add_argument("--methods", default=str(REPO / "docs" / "benchmarks_methods.json"))
    p.add_argument("--out", default=str(REPO / "docs" / "scaling.md"))
    a = p.parse_args(argv)
    overlap = json.loads(Path(a.overlap).read_text()) if Path(a.overlap).is_file() else None
    share = None
    if overlap and "median" in overlap:
        share = overlap["median"]["inline"]["ref_wait_s"] / overlap["median"]["cache"]["step_time_s"]
    methods = json.loads(Path(a.methods).read_text())["methods"] if Path(a.methods).is_file() else {}
    per_pair = {m: s["cache_bytes_per_pair"] for m, s in methods.items() if s.get("cache_bytes_per_pair")
                and "[" not in m}
    text = render(share, overlap, per_pair)
    Path(a.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
