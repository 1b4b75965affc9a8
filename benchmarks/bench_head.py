"""The lean head's forward + backward: its own backward (`logprobs.chunked.HeadLogps`) against the same
chunk loop differentiated by autograd under `torch.utils.checkpoint` (how the lean path ran before,
2026-12-05): time per call, median of interleaved repeats (CPU: process time, 1 thread; CUDA: wall
time between synchronisations, and the peak allocated memory of each).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_head.py [--json out.json]
    PYTHONPATH=$PWD python benchmarks/bench_head.py --device cuda --dtype bf16     # one GPU

Shapes (chunk 128, the default `model.logits_chunk`): on CPU bench_trl.py's policy head (384 response
positions, hidden 64, vocabulary 1000) and a larger one (1,024 positions, hidden 256, vocabulary 32,000);
on CUDA GPU issue 19's policy head (6,144 response positions: 8 pairs of 384 + 384; hidden 2048,
vocabulary 32,000) and a Llama-3-8B-like one (hidden 4096, vocabulary 128,256).
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

SHAPES = {"cpu": ((384, 64, 1000, 128, 200), (1024, 256, 32000, 128, 5)),  # M, H, V, chunk, calls per repeat
          "cuda": ((6144, 2048, 32000, 128, 5), (6144, 4096, 128256, 128, 2))}


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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    cuda, dtype = a.device == "cuda", {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    clock = time.perf_counter if cuda else time.process_time
    rows = []
    for m, hid, vocab, chunk, calls in SHAPES[a.device]:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(m, hid, generator=g).to(a.device, dtype).requires_grad_()
        w = (torch.randn(vocab, hid, generator=g) * hid ** -0.5).to(a.device, dtype).requires_grad_()
        at = torch.randint(0, vocab, (m, 1), generator=g).to(a.device)
        times, peak = {"checkpoint": [], "HeadLogps": []}, {}
        for _ in range(a.repeats):
            for name, fn in (("checkpoint", replayed), ("HeadLogps", own_backward)):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = clock()
                for _ in range(calls):
                    fn(h, w, at, chunk).sum().backward()
                if cuda:
                    torch.cuda.synchronize()
                    peak[name] = torch.cuda.max_memory_allocated() / 2**20
                times[name].append((clock() - t0) / calls * 1000)
        old, new = statistics.median(times["checkpoint"]), statistics.median(times["HeadLogps"])
        rows.append({"device": a.device, "dtype": a.dtype, "positions": m, "hidden": hid, "vocab": vocab, "chunk": chunk,
                     "checkpoint_ms": round(old, 3), "own_backward_ms": round(new, 3), "speedup": round(old / new, 3),
                     **({"peak_mib": {k: round(v, 1) for k, v in peak.items()}} if cuda else {})})
        print(f"{a.device} {a.dtype} M={m} H={hid} V={vocab} chunk={chunk}: checkpoint replay {old:.2f} ms, "
              f"HeadLogps {new:.2f} ms (x{old / new:.2f})" + (f"; peak {peak}" if cuda else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
