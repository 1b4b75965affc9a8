"""Scoring with the frozen reference: one batch (`score_batch`) and the offline pass that fills the
reference cache (`precompute_cache`). `score_batch` runs the reference through its `Head` and hands the output (and
the SAE layer's output) to `sparsepo.reference.scoring.score`, the function the live pipeline's
last stage calls too, so cache, precompute, inline and live modes produce the same numbers.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from sparsepo.reference.cache import write_index, write_shard
from sparsepo.reference.outputs import ReferenceOutputs
from sparsepo.reference.scoring import score

log = logging.getLogger(__name__)


@torch.no_grad()
def score_batch(head, batch, outputs: tuple[str, ...], *, topk: int, features=None) -> ReferenceOutputs:
    """Reference outputs for one collated batch. `head` is the frozen reference's
    `sparsepo.logprobs.head.Head` (bound to its model and chunk where it was loaded), or a scorer with
    its own `score_batch(batch, outputs)` (SePO's `oracle.OraclePair`). `features` (e.g.
    sae.runtime.SAEFeatures) captures a layer during the same forward and adds its outputs (SAE feature top-k)."""
    own = getattr(head, "score_batch", None)
    if own is not None:
        return own(batch, outputs)
    with features.capture(head.model) if features is not None else nullcontext() as cap:
        logits = head.forward(batch.input_ids, batch.attention_mask)
    hidden = cap.take() if features is not None else None
    got = score(logits, batch.input_ids, batch.response_mask, outputs, topk=topk, features=features, hidden=hidden)
    ro = ReferenceOutputs(example_ids=list(batch.example_ids))
    for name, value in got.items():
        setattr(ro, name, value)
    return ro


def precompute_cache(head, dataset, collate: Callable, *, cache_dir, components: dict,
                     outputs: tuple[str, ...], topk: int, batch_size: int, shard_size: int,
                     rank: int = 0, world_size: int = 1, device="cpu", features=None,
                     progress: bool = True) -> None:
    """Score the whole dataset into `cache_dir`. Shards are split over ranks (shard i on rank
    i % world); rank 0 writes the index last, so an interrupted run leaves no valid cache. `head`: what
    `score_batch` takes."""
    from tqdm.auto import tqdm

    n = len(dataset)
    num_shards = (n + shard_size - 1) // shard_size
    mine = list(range(rank, num_shards, world_size))
    entries: list[tuple[int, dict]] = []
    bar = tqdm(total=sum(min(shard_size, n - s * shard_size) for s in mine), desc="reference precompute",
               unit="pair", disable=not progress or rank != 0)
    for s in mine:
        lo, hi = s * shard_size, min((s + 1) * shard_size, n)
        ids: list[str] = []
        records: list[dict] = []
        for start in range(lo, hi, batch_size):
            from sparsepo.data import gather_rows

            batch = collate(gather_rows(dataset, list(range(start, min(start + batch_size, hi))))).to(device)
            ro = score_batch(head, batch, outputs, topk=topk, features=features)
            ids += list(batch.example_ids)
            records += ro.to_records(batch.response_mask)
            bar.update(batch.num_pairs)
        entries.append((s, write_shard(cache_dir, s, ids, records)))
    bar.close()
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, entries)
        entries = [e for part in gathered for e in part]
    if rank == 0:
        shards = [e for _, e in sorted(entries, key=lambda t: t[0])]
        write_index(cache_dir, components, shards)
        log.info("reference cache: %d pairs in %d shards at %s", n, num_shards, cache_dir)
    if world_size > 1:
        dist.barrier()
