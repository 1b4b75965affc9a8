"""Preference pairs for the demo world: two SFT samples per prompt, scored by the ground-truth
reward and labelled with Bradley-Terry noise (see the "Preference labels" paragraph of
`sparsepo.demo.world`)."""

from __future__ import annotations

import logging
import math
import random

import torch

from sparsepo.demo.reward import ground_truth_reward
from sparsepo.demo.sampling import Sample, sample_responses
from sparsepo.demo.sizes import WorldSize

log = logging.getLogger("sparsepo.demo")


def make_pairs(model, tokenizer, prompts: list[str], size: WorldSize, *, seed: int,
               progress: bool) -> tuple[list[dict], dict]:
    """Two SFT samples per prompt -> Bradley-Terry-labelled pairs; stops at size.n_pairs pairs."""
    gen = torch.Generator().manual_seed(seed + 1)
    label_rng = random.Random(seed + 2)
    eos = tokenizer.eos_token_id
    rows: list[dict] = []
    stats = {"prompts_used": 0, "skipped_identical": 0, "skipped_empty": 0, "skipped_equal_reward": 0,
             "samples": 0, "sample_reward_sum": 0.0, "sample_reward_sq": 0.0, "sample_tokens": 0,
             "samples_ended": 0}
    start = 0
    while len(rows) < size.n_pairs and start < len(prompts):
        want = size.n_pairs - len(rows)
        chunk = prompts[start:start + int(want * 1.25) + 8]
        start += len(chunk)
        prompt_ids = tokenizer(chunk)["input_ids"]
        doubled = [p for p in prompt_ids for _ in range(2)]
        samples: list[Sample] = sample_responses(model, doubled, max_new_tokens=size.max_new_tokens, eos_id=eos,
                                                 generator=gen, batch_size=size.sample_batch_size,
                                                 progress=progress, desc="pairs")
        texts = tokenizer.batch_decode([s.ids for s in samples], skip_special_tokens=True)
        for j, prompt in enumerate(chunk):
            a, b = texts[2 * j].strip(), texts[2 * j + 1].strip()
            for s, t in ((samples[2 * j], a), (samples[2 * j + 1], b)):
                r = ground_truth_reward(t)
                stats["samples"] += 1
                stats["sample_reward_sum"] += r
                stats["sample_reward_sq"] += r * r
                stats["sample_tokens"] += len(s.ids)
                stats["samples_ended"] += int(s.ended)
            if len(rows) >= size.n_pairs:
                continue
            stats["prompts_used"] += 1
            if not a or not b:
                stats["skipped_empty"] += 1
                continue
            if a == b:
                stats["skipped_identical"] += 1
                continue
            ra, rb = ground_truth_reward(a), ground_truth_reward(b)
            if ra == rb:
                stats["skipped_equal_reward"] += 1
                continue
            p_a = 1.0 / (1.0 + math.exp(-(ra - rb) / size.bt_tau))
            a_wins = label_rng.random() < p_a
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "reward_chosen": ra if a_wins else rb, "reward_rejected": rb if a_wins else ra,
                         "p_chosen": round(p_a if a_wins else 1 - p_a, 4)})
    n = max(1, stats["samples"])
    mean = stats["sample_reward_sum"] / n
    summary = {
        "n_pairs": len(rows),
        "prompts_used": stats["prompts_used"],
        "skipped_identical": stats["skipped_identical"],
        "skipped_empty": stats["skipped_empty"],
        "skipped_equal_reward": stats["skipped_equal_reward"],
        "sft_sample_count": stats["samples"],
        "sft_sample_mean_reward": round(mean, 4),
        "sft_sample_reward_std": round(math.sqrt(max(0.0, stats["sample_reward_sq"] / n - mean * mean)), 4),
        "sft_sample_mean_tokens": round(stats["sample_tokens"] / n, 2),
        "sft_sample_ended_fraction": round(stats["samples_ended"] / n, 4),
        "pairs_correctly_ordered": round(sum(r["reward_chosen"] > r["reward_rejected"] for r in rows)
                                         / max(1, len(rows)), 4),
        "mean_reward_chosen": round(sum(r["reward_chosen"] for r in rows) / max(1, len(rows)), 4),
        "mean_reward_rejected": round(sum(r["reward_rejected"] for r in rows) / max(1, len(rows)), 4),
    }
    if len(rows) < size.n_pairs:
        log.warning("[world] only %d valid pairs from %d prompts (wanted %d)", len(rows), len(prompts), size.n_pairs)
    return rows, summary
