"""SPO's KL estimators (sparsepo.losses.kl) against the dense full-vocabulary KL on random distributions.

    .venv/bin/python benchmarks/bench_spo_kl.py [--n 2000] [--vocab 50] [--out docs/bench_spo_kl.json]

Policy and reference next-token distributions are independent softmaxes of 2·N(0,1) logits (so the
reference's top-K often misses the policy's mass). Prints, per estimator: the mean relative shortfall
(dense − estimate)/dense of the tail-bin bound for K in {1, 4, 16, V} with the policy's and the union
support, the same for bins from the reference's top-K alone (the old reading), and the bias and
per-draw spread of k1/k3 from one sample per distribution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsepo.losses.kl import k1, k3, mask_support, topk_tail_kl, union_support


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--vocab", type=int, default=50)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", default="docs/bench_spo_kl.json", help="where the figures are written (JSON)")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(a.seed)
    p = (2 * torch.randn(a.n, a.vocab, generator=g, dtype=torch.float64)).log_softmax(-1)
    q = (2 * torch.randn(a.n, a.vocab, generator=g, dtype=torch.float64)).log_softmax(-1)
    dense = (p.exp() * (p - q)).sum(-1)
    print(f"dense KL: mean {dense.mean():.4f} over {a.n} distribution pairs, V={a.vocab}")
    figures: dict = {"n": a.n, "vocab": a.vocab, "seed": a.seed, "dense_kl_mean": dense.mean().item(), "topk_tail": {}}
    for k in sorted({1, 4, 16, a.vocab}):
        row = []
        for union in (False, True):
            ids, keep = union_support(p.topk(k, -1).indices, q.topk(k, -1).indices if union else None)
            est = topk_tail_kl(mask_support(p.gather(-1, ids), keep), mask_support(q.gather(-1, ids), keep))
            row.append(((dense - est) / dense).mean().item())
        ref_ids = q.topk(k, -1).indices
        ref_only = topk_tail_kl(p.gather(-1, ref_ids), q.gather(-1, ref_ids))
        figures["topk_tail"][k] = {"policy": row[0], "union": row[1],
                                   "reference_only": ((dense - ref_only) / dense).mean().item()}
        print(f"topk_tail K={k:3d}: shortfall policy {row[0]:.4f} | union {row[1]:.4f} | "
              f"reference top-K only {((dense - ref_only) / dense).mean():.4f}")
    y = torch.multinomial(p.exp(), 1, generator=g)
    for name, fn in (("k1", k1), ("k3", k3)):
        v = fn(p.gather(-1, y)[:, 0], q.gather(-1, y)[:, 0])
        figures[name] = {"relative_bias": ((v.mean() - dense.mean()) / dense.mean()).item(),
                         "std_over_mean_kl": ((v - dense).std() / dense.mean()).item()}
        print(f"{name}: mean {v.mean():.4f} (relative bias {(v.mean() - dense.mean()) / dense.mean():+.4f}), "
              f"per-draw std / mean KL {(v - dense).std() / dense.mean():.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(figures, indent=1))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
