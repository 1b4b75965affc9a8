"""Pairs → padded batches, and the deterministic order in which every rank reads them.

Pure torch; no `datasets` import. Data position is counted in samples (pairs), so a run resumed on
a different number of ranks reads the same global batches as long as the global batch is unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch


@dataclass
class PairBatch:
    """B pairs packed as 2B sequences: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    Token alignment: position t holds token x_t. `response_mask[:, t]` is 1.0 where x_t is a
    response token (never at t = 0, since every prompt has at least one token), so the response
    log-prob of a sequence is sum_t mask[t] * log p(x_t | x_<t), read off logits[:, t - 1]:
    `logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]`,
    masked with `response_mask[:, 1:]`.
    """

    input_ids: torch.Tensor
    """(2B, T) long, right-padded with pad_id."""
    attention_mask: torch.Tensor
    """(2B, T) long: 1 on prompt and response tokens, 0 on padding."""
    response_mask: torch.Tensor
    """(2B, T) float: 1.0 on response tokens (including their eos), else 0.0."""
    prompt_lengths: torch.Tensor
    """(2B,) long."""
    response_lengths: torch.Tensor
    """(2B,) long; equals response_mask.sum(1)."""
    example_ids: list[str]
    """(B,) one id per pair, in the order of the chosen rows (and of the rejected rows)."""

    @property
    def num_pairs(self) -> int:
        return len(self.example_ids)

    def to(self, device, non_blocking: bool = False) -> PairBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return PairBatch(**moved)

    def _half(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        b = self.num_pairs
        if x.shape[0] != 2 * b:
            raise ValueError(f"expected a tensor with 2B={2 * b} rows (chosen then rejected), got "
                             f"shape {tuple(x.shape)}")
        return x[:b] if first else x[b:]

    def chosen(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen half, x[:B], of a (2B, ...) tensor computed on this batch."""
        return self._half(x, True)

    def rejected(self, x: torch.Tensor) -> torch.Tensor:
        """The rejected half, x[B:], of a (2B, ...) tensor computed on this batch."""
        return self._half(x, False)


def collate_pairs(rows: list[dict], pad_id: int, *, pad_to_multiple_of: int | None = None,
                  length: int | None = None) -> PairBatch:
    """Pack rows (example_id, prompt_ids, chosen_ids, rejected_ids) chosen-first into one PairBatch.

    T is the longest prompt+response, rounded up to `pad_to_multiple_of` when given (e.g. 8 for
    tensor cores); `length`: T is exactly this, whatever the rows (`sparsepo.padding`: models whose
    output depends on the padded length); a longer row is refused.
    """
    if not rows:
        raise ValueError("collate_pairs needs at least one row")
    seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + \
           [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    t = max(len(p) + len(y) for p, y in seqs)
    if length is not None:
        if t > length:
            longest = max(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
            raise ValueError(f"pair {rows[longest % len(rows)].get('example_id')}: {t} tokens, longer than the "
                             f"fixed batch length {length}")
        t = length
    elif pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    n = len(seqs)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    response_mask = torch.zeros((n, t), dtype=torch.float32)
    for i, (p, y) in enumerate(seqs):
        if not p or not y:
            raise ValueError(f"pair {rows[i % len(rows)].get('example_id')}: empty prompt or response")
        input_ids[i, :len(p) + len(y)] = torch.tensor(list(p) + list(y), dtype=torch.long)
        attention_mask[i, :len(p) + len(y)] = 1
        response_mask[i, len(p):len(p) + len(y)] = 1.0
    return PairBatch(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
        prompt_lengths=torch.tensor([len(p) for p, _ in seqs], dtype=torch.long),
        response_lengths=torch.tensor([len(y) for _, y in seqs], dtype=torch.long),
        example_ids=[str(r["example_id"]) for r in rows],
    )


def gather_rows(ds, indices: list[int]) -> list[dict]:
    """Rows of a tokenised dataset as dicts, in `indices` order (one Arrow read, not one per row)."""
    cols = ds[list(indices)]
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_rows) from a torch.Generator seeded by sha256(seed, epoch).

    Identical on every rank and every run with the same torch version (randperm's algorithm).
    """
    digest = hashlib.sha256(f"sparsepo.epoch_order:{seed}:{epoch}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(num_rows, generator=g).tolist()


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Optimiser steps in one epoch; the last incomplete global batch is dropped (every step sees
    exactly global_batch pairs; the dropped rows differ per epoch since the order is reshuffled)."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be at least 1, got {global_batch}")
    return num_rows // global_batch


def micro_batch_indices(order: list[int], *, step: int, micro_batch_size: int, grad_accum: int,
                        dp_size: int, dp_rank: int, micro_step: int) -> list[int]:
    """Rows of micro-step `micro_step` on data-parallel rank `dp_rank` during optimiser step `step`.

    Step s consumes order[s*G:(s+1)*G], G = micro_batch_size * grad_accum * dp_size. Within it the
    layout is micro-step-major: micro-step m of rank r reads the slice starting at
    s*G + (m*dp_size + r)*micro_batch_size. So all ranks together always consume `order` front to
    back, and any (micro, accum, dp) with the same G sees the same global batches.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
    if not 0 <= micro_step < grad_accum:
        raise ValueError(f"micro_step={micro_step} outside [0, grad_accum={grad_accum})")
    g = micro_batch_size * grad_accum * dp_size
    if step < 0 or (step + 1) * g > len(order):
        raise ValueError(f"step {step} needs rows [{step * g}, {(step + 1) * g}) of an order of "
                         f"{len(order)} (steps_per_epoch={len(order) // g})")
    start = step * g + (micro_step * dp_size + dp_rank) * micro_batch_size
    return order[start:start + micro_batch_size]
