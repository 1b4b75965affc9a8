"""Cache mode: fingerprint the reference inputs, precompute the cache when missing, open it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from sparsepo.engine.collectives import gather, is_multi, on_one_rank
from sparsepo.reference.cache import (INDEX, MODEL_FILES, CacheError, CacheReader, fingerprint_components,
                                      hash_files)
from sparsepo.reference.scorer import precompute_cache

log = logging.getLogger(__name__)


def reference_path(cfg) -> str:
    return cfg.reference.path or cfg.model.path


def cache_dir(cfg) -> Path:
    return Path(cfg.reference.cache_dir or Path(cfg.logging.output_dir) / "ref_cache")


def cache_settings(cfg, outputs: tuple[str, ...], features=None) -> dict:
    """Every option that changes the cached numbers (data/tokenisation settings are in the data part)."""
    settings = {"outputs": list(outputs), "precision": cfg.train.precision}
    if "topk_ids" in outputs:
        settings["topk"] = cfg.reference.topk
    if features is not None:
        settings.update(sae=features.fingerprint, layer=features.layer, k=features.k)
    if "oracle_scores" in outputs:  # SePO: both oracle models' weights key the cache (and are checked first)
        from sparsepo.reference.oracle import oracle_fingerprints, oracle_manifest

        settings.update(oracle_fingerprints(oracle_manifest(cfg)))
    return settings


def scorer_name(cfg, outputs: tuple[str, ...]) -> str:
    return f"the SePO oracle pair in {cfg.reference.oracle}" if "oracle_scores" in outputs else reference_path(cfg)


def load_scorer(cfg, outputs: tuple[str, ...], device):
    """What scores `outputs` in cache and inline modes: the oracle pair for oracle_scores (SePO loads
    no reference model at all), else the frozen reference."""
    if "oracle_scores" in outputs:
        from sparsepo.reference.oracle import OraclePair, oracle_manifest

        return OraclePair.load(oracle_manifest(cfg), device=device, precision=cfg.train.precision,
                               chunk=cfg.model.logits_chunk)
    from sparsepo.models import load_frozen_model

    return load_frozen_model(reference_path(cfg), device=device, precision=cfg.train.precision,
                             attn_implementation=cfg.model.attn_implementation)


def local_components(cfg, data_fingerprint: str, outputs: tuple[str, ...], features=None) -> dict:
    ref = reference_path(cfg)
    return fingerprint_components(model_dir=ref, tokenizer_dir=cfg.model.tokenizer or ref, data=data_fingerprint,
                                  settings=cache_settings(cfg, outputs, features))


def model_fingerprint(cfg) -> str:
    """The reference weights' fingerprint (the cache key's "model" part; an SAE's sidecar records
    the one it was trained on). Read on one rank and shared: the files may be large."""
    return on_one_rank(lambda: hash_files(reference_path(cfg), MODEL_FILES))


def components(cfg, data_fingerprint: str, outputs: tuple[str, ...], features=None) -> dict:
    """Computed on rank 0 and shared: every rank must key the cache identically (and only one
    rank reads the model files)."""
    return on_one_rank(lambda: local_components(cfg, data_fingerprint, outputs, features))


def ensure_cache(cfg, outputs: tuple[str, ...], dataset, collate, *, data_fingerprint: str, ctx, features=None,
                 force: bool = False) -> CacheReader:
    """Open the reference cache for this run, precomputing it first when it is missing (or `force`)."""
    expected = components(cfg, data_fingerprint, outputs, features)
    directory = cache_dir(cfg)
    if force or not (directory / INDEX).is_file():
        if ctx.is_main:
            log.info("reference cache %s missing: scoring %d pairs with %s", directory, len(dataset),
                     scorer_name(cfg, outputs))
        model = load_scorer(cfg, outputs, ctx.device)
        precompute_cache(model, dataset, collate, cache_dir=directory, components=expected, outputs=outputs,
                         topk=cfg.reference.topk, batch_size=cfg.reference.batch_size,
                         shard_size=cfg.reference.shard_size, rank=ctx.rank, world_size=ctx.world_size,
                         device=ctx.device, features=features, progress=cfg.logging.progress,
                         chunk=cfg.model.logits_chunk)
        del model
    return open_cache(directory, expected, progress=cfg.logging.progress)


def open_cache(directory: Path, expected: dict | None, *, progress: bool = False) -> CacheReader:
    """Open the cache and verify every shard now, not on first use mid-run: each rank of this
    process group checks its share (shard s: rank s % world size), rank 0 shows a progress bar,
    and every rank refuses the same damaged shards. Collective: call it on every rank."""
    reader = CacheReader(directory, expected)
    me, world = (dist.get_rank(), dist.get_world_size()) if is_multi() else (0, 1)
    failed = [msg for part in gather(reader.verify(rank=me, world_size=world, progress=progress and me == 0))
              for msg in part]
    if failed:
        more = f" ({len(failed) - 1} more shard(s) damaged too)" if len(failed) > 1 else ""
        raise CacheError(f"{failed[0]}{more}")
    return reader
