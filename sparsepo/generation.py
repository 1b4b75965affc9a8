"""Policy samples for SPO's KL: the `generation` config section and the pure pieces around
`PolicyEngine.generate` (prompts out of a pair batch, keyed sampling, the sample batch).

    prompts = prompts_of(batch, pad_id)                          # left-padded prompts + keys
    sampler = KeyedSampler(prompts.keys, seed=..., prompt_width=prompts.input_ids.shape[1])
    ids, path = policy.generate(prompts.input_ids, prompts.attention_mask, processor=sampler, ...)
    samples = sample_batch(ids, prompts, eos_id=..., pad_id=...)  # right-padded, sample_mask

Sampling is keyed: the noise for sample j of example e at position t comes from a generator seeded
by (seed, e, j, t) (t counted from the end of the prompt), and a token is drawn by the Gumbel-max trick inside a greedy decode. So a sample
depends only on its prompt, its key and the weights — not on which rank drew it, nor on what else
was in the batch — and 2-rank generation equals 1-rank generation for the same seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Prompts:
    input_ids: Tensor
    """(N, P) long, LEFT-padded (decoder-only generation appends on the right)."""
    attention_mask: Tensor
    """(N, P) long."""
    lengths: Tensor
    """(N,) long: prompt tokens per row."""
    keys: list[str]
    """(N,) "example_id#j": the sample's sampling key."""


def prompts_of(batch, pad_id: int, samples_per_prompt: int = 1) -> Prompts:
    """The prompts of a PairBatch's chosen rows, each repeated `samples_per_prompt` times."""
    items = [(eid, batch.input_ids[i, :int(batch.prompt_lengths[i])].tolist()) for i, eid in enumerate(batch.example_ids)]
    return prompts_from(items, pad_id, samples_per_prompt, device=batch.input_ids.device)


def prompts_from(items: list[tuple[str, list[int]]], pad_id: int, samples_per_prompt: int = 1,
                 device="cpu") -> Prompts:
    """(prompt id, token ids) items -> left-padded Prompts, sample j of prompt e keyed "e#j"."""
    rows, keys = [], []
    for pid, ids in items:
        for j in range(samples_per_prompt):
            rows.append(list(ids))
            keys.append(f"{pid}#{j}")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for n, r in enumerate(rows):
        input_ids[n, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[n, width - len(r):] = 1
    return Prompts(input_ids.to(device), mask.to(device), torch.tensor([len(r) for r in rows]), keys)


def _key_seed(seed: int, key: str, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class KeyedSampler:
    """A transformers logits processor that turns a greedy decode into keyed sampling: temperature,
    then top-p, then Gumbel(0,1) noise drawn from a generator seeded by (seed, key, position); the
    argmax of logits + Gumbel noise is a draw from the (warped) softmax (the Gumbel-max trick)."""

    def __init__(self, keys: list[str], *, seed: int, prompt_width: int, temperature: float = 1.0,
                 top_p: float = 1.0):
        """`prompt_width`: the padded prompt width P of the batch; position = tokens generated so far,
        so a row's noise does not depend on how wide the other prompts of its batch were."""
        self.keys, self.seed, self.prompt_width = keys, seed, prompt_width
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            probs = scores.softmax(-1)
            sorted_probs, order = probs.sort(-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
            drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= self.top_p)
            scores = scores.masked_fill(drop, float("-inf"))
        position = input_ids.shape[1] - self.prompt_width
        noise = torch.empty_like(scores)
        tiny = torch.finfo(scores.dtype).tiny
        for n, key in enumerate(self.keys):
            g = torch.Generator().manual_seed(_key_seed(self.seed, key, position))
            u = torch.rand(scores.shape[-1], generator=g).clamp_(min=tiny, max=1 - 1e-7)
            noise[n] = -torch.log(-torch.log(u)).to(noise.device)
        return scores + noise


@dataclass
class SampleBatch:
    """S samples, RIGHT-padded like a PairBatch: prompt then generated tokens, so that scoring them is
    the same forward as scoring pairs (no position ids needed)."""

    input_ids: Tensor
    """(S, T) long."""
    attention_mask: Tensor
    """(S, T) long."""
    sample_mask: Tensor
    """(S, T) float 0/1: 1 on generated tokens up to and including the first eos."""
    keys: list[str]

    @property
    def response_mask(self) -> Tensor:  # the name the one scoring function reads
        return self.sample_mask

    @property
    def lengths(self) -> Tensor:
        return self.sample_mask.sum(-1)

    def to(self, device) -> "SampleBatch":
        return SampleBatch(self.input_ids.to(device), self.attention_mask.to(device), self.sample_mask.to(device),
                           self.keys)


def sample_batch(generated: Tensor, prompts: Prompts, *, eos_id: int, pad_id: int) -> SampleBatch:
    """generate()'s output (N, P + new) -> a right-padded SampleBatch; a sample ends at its first eos
    (kept, like a response's eos) or at the last generated position."""
    width = prompts.input_ids.shape[1]
    new = generated[:, width:]
    is_eos = new == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    keep = ~after_eos
    rows = []
    for n in range(generated.shape[0]):
        p = int(prompts.lengths[n])
        rows.append((generated[n, width - p:width], new[n][keep[n]]))
    t = max(len(p) + len(y) for p, y in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long, device=generated.device)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(ids.shape, dtype=torch.float32, device=generated.device)
    for n, (p, y) in enumerate(rows):
        ids[n, :len(p) + len(y)] = torch.cat([p, y])
        attn[n, :len(p) + len(y)] = 1
        mask[n, len(p):len(p) + len(y)] = 1.0
    return SampleBatch(ids, attn, mask, list(prompts.keys))
