"""The lean head's forward + backward: its own backward (`logprobs.chunked.HeadLogps`) against the same
chunk loop differentiated by autograd under `torch.utils.checkpoint` (how the lean path ran before,
2026-12-05): CPU time per call, median of interleaved repeats, 1 thread.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_head.py [--json out.json]

Shapes: bench_trl.py's policy head (384 response positions, hidden 64, vocabulary 1000) and a larger one
(1,024 positions, hidden 256, vocabulary 32,000); chunk 128 (the default `model.logits_chunk`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparsepo.logprobs.chunked import HeadLogps
from sparsepo.logprobs.lean import chunk_stats

SHAPES = ((384, 64, 1000, 128, 200), (1024, 256, 32000, 128, 5))  # M, H, V, chunk, calls per repeat


def replayed(h, w, at, chunk):
    def one(hc, a):
        logits = F.linear(hc, w).float()
        return logits.gather(-1, a) - torch.logsumexp(logits, -1, keepdim=True)
    return torch.cat([checkpoint(one, h[lo:lo + chunk], at[lo:lo + chunk], use_reentrant=False)
                      for lo in range(0, h.shape[0], chunk)])


def own_backward(h, w, at, chunk):
    stats = functools.partial(chunk_stats, topk=0, entropy=False, sq_mass=False)
    return HeadLogps.apply(h, w, None, at, chunk, None, lambda x: F.linear(x, w), stats)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for m, hid, vocab, chunk, calls in SHAPES:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(m, hid, generator=g).requires_grad_()
        w = torch.randn(vocab, hid, generator=g).requires_grad_()
        at = torch.randint(0, vocab, (m, 1), generator=g)
        times = {"checkpoint": [], "HeadLogps": []}
        for _ in range(a.repeats):
            for name, fn in (("checkpoint", replayed), ("HeadLogps", own_backward)):
                t0 = time.process_time()
                for _ in range(calls):
                    fn(h, w, at, chunk).sum().backward()
                times[name].append((time.process_time() - t0) / calls * 1000)
        old, new = statistics.median(times["checkpoint"]), statistics.median(times["HeadLogps"])
        rows.append({"positions": m, "hidden": hid, "vocab": vocab, "chunk": chunk, "checkpoint_ms": round(old, 3),
                     "own_backward_ms": round(new, 3), "speedup": round(old / new, 3)})
        print(f"M={m} H={hid} V={vocab} chunk={chunk}: checkpoint replay {old:.2f} ms, HeadLogps {new:.2f} ms "
              f"(x{old / new:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
