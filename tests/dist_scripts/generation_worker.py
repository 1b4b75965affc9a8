"""Worker for tests/test_generation.py: keyed sampling from a ZeRO-3 PolicyEngine on every rank.

    torchrun --nproc_per_node N tests/dist_scripts/generation_worker.py --model DIR --out DIR --params gathered

Eight prompts, split evenly over the ranks in order; every rank writes out/samples_rank{r}.pt
({key: (input_ids row, sample_mask row)}) and out/info_rank{r}.json (path, tokens/s, shard size),
then takes one training step to show the engine still trains after generating.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsepo.data.batching import collate_pairs
from sparsepo.engine.dist import init_distributed, shutdown
from sparsepo.engine.policy import PolicyEngine
from sparsepo.generation import KeyedSampler, prompts_of, sample_batch
from sparsepo.logprobs.head import PlainHead
from sparsepo.models import pair_forward

PAD, EOS = 0, 2


def rows():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        prompt = torch.randint(3, 100, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(dict(example_id=f"p{i}", prompt_ids=prompt, chosen_ids=[5, EOS], rejected_ids=[6, 7, EOS]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", default="gathered")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    args = ap.parse_args()
    ctx = init_distributed()
    per = 8 // ctx.world_size
    mine = rows()[ctx.rank * per:(ctx.rank + 1) * per]
    ds = {"train_batch_size": per * ctx.world_size, "train_micro_batch_size_per_gpu": per,
          "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 10**9}
    policy = PolicyEngine.build(args.model, ds, schedule=("constant", {}))
    batch = collate_pairs(mine, PAD)
    prompts = prompts_of(batch, PAD, samples_per_prompt=2)
    t0 = time.perf_counter()
    ids, path = policy.generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=args.max_new_tokens,
                                processor=KeyedSampler(prompts.keys, seed=7, prompt_width=prompts.input_ids.shape[1]), pad_token_id=PAD, eos_token_id=EOS,
                                params=args.params)
    seconds = time.perf_counter() - t0
    samples = sample_batch(ids, prompts, eos_id=EOS, pad_id=PAD)
    torch.save({k: (samples.input_ids[n][samples.attention_mask[n].bool()], samples.sample_mask[n][samples.attention_mask[n].bool()])
                for n, k in enumerate(samples.keys)}, f"{args.out}/samples_rank{ctx.rank}.pt")
    loss = -pair_forward(PlainHead(policy), batch).seq_logps.mean()
    policy.backward(loss)
    policy.step()
    local, full = policy.parameter_counts()
    info = dict(path=path, seconds=seconds, tokens=int(samples.lengths.sum()), local=local, full=full,
                loss=float(loss))
    with open(f"{args.out}/info_rank{ctx.rank}.json", "w") as f:
        json.dump(info, f)
    shutdown(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
