"""The arithmetic and the write-up of benchmarks/gpu_bench.py: model FLOPs, MFU, one row per run,
docs/gpu_bench.json and its table in docs/benchmarks.md. Pure (no torch, no GPU), unit-tested in
tests/test_gpu_report.py.

MFU = model FLOPs of a step / step time / the measured peak (a large bf16 matmul on the same device,
`matmul_peak` in gpu_bench.py), with the model FLOPs of PaLM's appendix B:
  training (forward + backward) per token: 6·N + 12·L·h·s   (N: matmul parameters, L layers, h hidden, s sequence)
  forward only (an inline reference) per token: 2·N + 4·L·h·s
N counts every parameter that multiplies an activation: all of them except the input embedding
table when the LM head is untied (a lookup, no FLOPs); with a tied head, all of them. Attention is
counted over the full s×s square (PaLM's convention; a causal kernel skips half of it).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

BEGIN, END = "<!-- gpu_bench:begin -->", "<!-- gpu_bench:end -->"


def matmul_params(n_params: int, *, vocab: int, hidden: int, tied: bool) -> int:
    return n_params if tied else n_params - vocab * hidden


def step_flops(*, n_params: int, vocab: int, hidden: int, layers: int, seq: int, tokens: int, tied: bool = False,
               reference_forward: bool = False) -> float:
    """Model FLOPs of one optimiser step over `tokens` policy tokens (chosen + rejected rows); with
    `reference_forward`, the frozen reference's forward over the same tokens too (inline modes)."""
    n = matmul_params(n_params, vocab=vocab, hidden=hidden, tied=tied)
    train = 6 * n + 12 * layers * hidden * seq
    ref = 2 * n + 4 * layers * hidden * seq if reference_forward else 0
    return float(tokens) * (train + ref)


def mfu(flops: float, step_s: float, peak_flops: float) -> float:
    """Achieved FLOP/s over the measured peak: 0.4 = 40% MFU."""
    if step_s <= 0 or peak_flops <= 0:
        raise ValueError(f"mfu: step time {step_s} s and peak {peak_flops} FLOP/s must be positive")
    return flops / step_s / peak_flops


def steady(times: list[float], skip: int) -> float:
    """Median step time after the first `skip` steps (issue 19: steps 6-30 of 30, skip=5)."""
    kept = times[skip:] if len(times) > skip else times
    if not kept:
        raise ValueError("no step times")
    return statistics.median(kept)


def row(*, system: str, mode: str, times: list[float], skip: int, tokens: int, peak_alloc_gib: float | None,
        flops: float, peak_flops: float | None, settings: dict | None = None) -> dict:
    step_s = steady(times, skip)
    out = {"system": system, "mode": mode, "step_s": round(step_s, 5), "tokens_per_s": round(tokens / step_s, 1),
           "peak_alloc_gib": None if peak_alloc_gib is None else round(peak_alloc_gib, 2),
           "mfu": None if not peak_flops else round(mfu(flops, step_s, peak_flops), 4), "steps": len(times)}
    if settings:
        out["settings"] = settings
    return out


def ratios(rows: list[dict]) -> dict[str, float]:
    """TRL's step time / sparsepo's for the like-with-like pairs present (> 1: sparsepo faster)."""
    by = {(r["system"], r["mode"]): r["step_s"] for r in rows}
    pairs = {"cache_vs_trl_precompute": (("trl", "precompute"), ("sparsepo", "cache")),
             "inline_vs_trl_inline": (("trl", "inline"), ("sparsepo", "inline"))}
    return {k: round(by[t] / by[s], 3) for k, (t, s) in pairs.items() if t in by and s in by}


def render_table(res: dict) -> str:
    w = res["workload"]
    lines = [f"Measured {res['date']} on {res['device']} (torch {res['torch']}, DeepSpeed {res['deepspeed']}, "
             f"TRL {res['trl'] or 'not installed'}); matmul peak {res['peak_tflops']} TFLOP/s "
             f"({res['peak_dtype']}). Workload: Llama hidden {w['hidden']}, {w['layers']} layers, vocabulary "
             f"{w['vocab']} ({res['n_params']:,} parameters), {w['batch']} pairs of {w['prompt']} + {w['response']} "
             f"tokens a step ({2 * w['batch'] * (w['prompt'] + w['response'])} tokens), {w['steps']} steps, median "
             f"of steps {w['skip'] + 1}-{w['steps']}. Command: `{res['command']}`.", "",
             "| system | mode | s/step | tokens/s | peak alloc GiB | MFU |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        gib = "–" if r["peak_alloc_gib"] is None else f"{r['peak_alloc_gib']:.1f}"
        m = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['system']} | {r['mode']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {gib} | {m} |")
    if res.get("ratios"):
        lines += ["", "TRL's s/step ÷ sparsepo's (> 1: sparsepo faster): "
                  + ", ".join(f"{k} {v:.2f}×" for k, v in res["ratios"].items())]
    return "\n".join(lines)


def write(res: dict, json_path: Path, md_path: Path | None) -> None:
    """docs/gpu_bench.json, and the table between the gpu_bench markers of docs/benchmarks.md
    (appended under a heading when the markers are not there yet)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    if md_path is None:
        return
    block = f"{BEGIN}\n{render_table(res)}\n{END}"
    text = md_path.read_text() if md_path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## GPU side by side (`benchmarks/gpu_bench.sh`)\n\n" + block + "\n"
    md_path.write_text(text)
