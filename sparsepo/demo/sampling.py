"""Sampling from, and scoring with, the demo's tiny causal LMs (CPU, no `generate`).

`sample_responses` is a plain ancestral-sampling loop with a KV cache. Prompts are bucketed by
token length so a batch never needs padding (the demo prompts come in a handful of lengths), which
keeps the loop independent of how a transformers version builds padded attention masks. Randomness
comes only from the `torch.Generator` passed in, so results are reproducible given its seed and the
batch size.

`response_logps` is the teacher-forced counterpart: the summed log-probability of given response
tokens (eos included when the sample ended with it) after the prompt, computed with right padding.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    ids: list[int]  # response token ids, eos excluded
    ended: bool  # True when the model emitted eos within max_new_tokens

    def scored_ids(self, eos_id: int) -> list[int]:
        """The tokens the model actually chose: `ids` plus eos when it ended."""
        return self.ids + [eos_id] if self.ended else list(self.ids)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[int]:
    """Run with `num_threads` intra-op threads, restoring the previous value afterwards.

    None: keep the current setting when OMP_NUM_THREADS is set, else half the machine's cores (at most
    4, at least 1). The demo models are so small that extra threads mostly add synchronisation; on a
    busy 2-core machine 2 threads ran the sampling loop ~10x slower than 1."""
    before = torch.get_num_threads()
    if num_threads is None:
        num_threads = before if os.environ.get("OMP_NUM_THREADS") else max(1, min(4, (os.cpu_count() or 1) // 2))
    torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars (weight loading/saving) unless `enabled`; restored after."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if not enabled and before:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _buckets(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by prompt length (ascending), each group cut into batches."""
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_len.setdefault(len(ids), []).append(i)
    return [idx[s:s + batch_size] for _, idx in sorted(by_len.items()) for s in range(0, len(idx), batch_size)]


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_cls: type) -> str:
    # later transformers 5.x renamed `past_key_values` to `cache`; use whichever this version takes
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Forward `ids` after what `cache` holds (cache updated in place); next-token logits (B,V)."""
    return model(input_ids=ids, use_cache=True, **{_cache_kwarg(type(model)): cache}).logits[:, -1, :].float()


@torch.no_grad()
def sample_responses(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                     generator: torch.Generator, temperature: float = 1.0, batch_size: int = 256,
                     progress: bool = False, desc: str = "sampling") -> list[Sample]:
    """One sample per prompt (repeat a prompt to get several). temperature 0 means greedy."""
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt: every prompt needs at least one token (bos)")
    was_training = model.training
    model.eval()
    out: list[Sample | None] = [None] * len(prompt_ids)
    bar = _progress(len(prompt_ids), desc, progress)
    try:
        for batch in _buckets(prompt_ids, batch_size):
            ids = torch.tensor([list(prompt_ids[i]) for i in batch], dtype=torch.long)
            cache = _new_cache(model)
            logits = _step(model, ids, cache)
            done = torch.zeros(len(batch), dtype=torch.bool)
            steps: list[torch.Tensor] = []
            for t in range(max_new_tokens):
                if temperature == 0:
                    tok = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                steps.append(tok)
                done |= tok == eos_id
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                logits = _step(model, tok[:, None], cache)
            gen = torch.stack(steps, dim=1).tolist()
            for row, i in zip(gen, batch):
                if eos_id in row:
                    out[i] = Sample(ids=row[:row.index(eos_id)], ended=True)
                else:
                    out[i] = Sample(ids=row, ended=False)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


@torch.no_grad()
def response_logps(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                   pad_id: int, batch_size: int = 128) -> list[float]:
    """sum_t log p(response_t | prompt, response_<t) for each pair (0.0 for an empty response)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    was_training = model.training
    model.eval()
    result: list[float] = []
    try:
        for s in range(0, len(prompt_ids), batch_size):
            prompts, responses = prompt_ids[s:s + batch_size], response_ids[s:s + batch_size]
            seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            target = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions holding response tokens
            for j, (p, x) in enumerate(zip(prompts, seqs)):
                ids[j, :len(x)] = torch.tensor(x)
                target[j, len(p):len(x)] = True
            # right padding + causal attention: the pads come after every real token, so no mask needed
            logits = model(input_ids=ids, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            result.extend((logp * target[:, 1:]).sum(-1).tolist())
    finally:
        model.train(was_training)
    return result
