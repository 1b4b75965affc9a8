"""Peak memory and time of one training step, plain log-probs (full float32 logits) vs the lean path.

    PYTHONPATH=$PWD python benchmarks/bench_logprobs.py            # vocab 128256, T 1024, 2 pairs, hidden 64

A step, as `trainer.micro_step` takes it with an inline reference: the frozen reference scores the
pairs (`reference.scorer.score_batch`), the policy runs `models.pair_forward`, DPO's loss, backward,
AdamW step — with `model.logits_chunk` = 0 (plain) and the chunk sizes asked for. Each setting runs
in its own subprocess, so `resource.getrusage(RUSAGE_SELF).ru_maxrss` is that setting's peak RSS;
"step peak" subtracts the RSS measured after the models are built (weights, optimizer state, imports).
A setting whose estimated peak exceeds the memory available now is not run (said in the output).
Writes docs/bench_logprobs.json and prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsepo.data.batching import collate_pairs
    from sparsepo.losses import get_method
    from sparsepo.losses.inputs import build_loss_inputs
    from sparsepo.logprobs.head import Head
    from sparsepo.models import pair_forward
    from sparsepo.reference.scorer import score_batch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=args.vocab,
                         max_position_embeddings=args.seq_len)
    policy = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(config)
    reference.load_state_dict(policy.state_dict())
    reference.eval().requires_grad_(False)
    policy_head, ref_head = Head.for_model(policy, args.chunk), Head.for_model(reference, args.chunk)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    prompt_len = int(args.seq_len * args.prompt_frac)
    resp = args.seq_len - prompt_len

    def ids(n):
        return torch.randint(3, args.vocab, (n,), generator=g).tolist()

    rows = [dict(example_id=str(i), prompt_ids=ids(prompt_len), chosen_ids=ids(resp),
                 rejected_ids=ids(resp - 8 * i)) for i in range(args.pairs)]
    batch = collate_pairs(rows, pad_id=0)
    spec = get_method("dpo")
    params = spec.params_cls() if hasattr(spec, "params_cls") else None
    for p in policy.parameters():  # AdamW state allocated before the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    base = rss_mb()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        ref = score_batch(ref_head, batch, ("seq_logps",), topk=0)
        fwd = pair_forward(policy_head, batch)
        out = spec.loss_fn(build_loss_inputs(spec, fwd, batch.response_mask, ref), params)
        out.losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del ref, fwd, out
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"chunk": args.chunk, "peak_rss_mb": round(peak, 1), "base_rss_mb": round(base, 1),
            "step_peak_mb": round(peak - base, 1), "step_s": [round(t, 3) for t in times],
            "step_s_best": round(min(times), 3)}


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--also-seq-lens", default="512", help="shorter T also measured (where the plain path fits "
                                                            "in memory), to show the growth with T")
    ap.add_argument("--prompt-frac", type=float, default=0.25, help="prompt share of T (the rest: responses)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunks", default="0,256,1024", help="model.logits_chunk values (0 = plain)")
    ap.add_argument("--json", default=str(REPO / "docs" / "bench_logprobs.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    logits_mb = 2 * args.pairs * args.seq_len * args.vocab * 4 / 2**20
    results = []
    lens = [args.seq_len] + [int(t) for t in args.also_seq_lens.split(",") if t]
    for seq_len, chunk in ((t, int(c)) for t in lens for c in args.chunks.split(",")):
        need = (5 * logits_mb * seq_len / args.seq_len if chunk == 0 else 0) + 1500
        if need > 0.85 * available_mb():
            results.append({"seq_len": seq_len, "chunk": chunk, "skipped": f"estimated {need:.0f} MB > 85% of {available_mb():.0f} MB "
                                                       f"available now"})
            print(results[-1], flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", f"--chunk={chunk}", f"--seq-len={seq_len}"] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("vocab", "prompt_frac", "pairs", "hidden", "steps")]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
        results.append({"seq_len": seq_len, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(results[-1], flush=True)
    data = {"command": "PYTHONPATH=$PWD python benchmarks/bench_logprobs.py " + " ".join(sys.argv[1:]),
            "setting": {k: getattr(args, k) for k in ("vocab", "seq_len", "prompt_frac", "pairs", "hidden", "steps")},
            "one_fp32_logits_mb": round(logits_mb, 1), "results": results}
    Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    print("| T | logits_chunk | peak RSS (MB) | step peak above the built models (MB) | best step (s) |\n"
          "|---|---|---|---|---|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['seq_len']} | {r['chunk']} | not run: {r['skipped']} | | |")
        else:
            print(f"| {r['seq_len']} | {r['chunk'] or '0 (plain)'} | {r['peak_rss_mb']:.0f} | {r['step_peak_mb']:.0f} "
                  f"| {r['step_s_best']} |")


if __name__ == "__main__":
    main()
