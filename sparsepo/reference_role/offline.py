"""Cache mode: fingerprint the reference inputs, precompute the cache when missing, open it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from sparsepo.config.paths import run_tokenizer
from sparsepo.engine.collectives import gather, is_multi, on_one_rank
from sparsepo.padding import batch_length
from sparsepo.reference.cache import INDEX, CacheError, CacheReader, fingerprint_components
from sparsepo.reference.scorer import precompute_cache
from sparsepo.reference_role.scorers import reference_path, scorer_for
from sparsepo.rundir import acquire_run_lock, release_run_dir

log = logging.getLogger(__name__)


def cache_dir(cfg) -> Path:
    return Path(cfg.reference.cache_dir or Path(cfg.logging.output_dir) / "ref_cache")


def eval_cache_cfg(cfg, version: str | None = None):
    """`cfg` with the eval pairs' cache directory (`<cache dir>_eval`, beside the training one) in place of
    the training one: cache mode fills it on the policy ranks, live mode in the reference group.
    `version`: one moved reference's (TR-DPO in live mode, `follow_live.eval_version`), `<cache dir>_eval-<version>`."""
    from dataclasses import replace

    directory = cache_dir(cfg)
    name = directory.name + "_eval" + (f"-{version}" if version else "")
    return replace(cfg, reference=replace(cfg.reference, cache_dir=str(directory.with_name(name))))


def wait_for_cache(directory: Path, expected: dict, *, timeout_s: float, progress: bool = False) -> CacheReader:
    """Open a cache another role is writing (live mode's eval cache, written by the reference group before
    it serves the first step) once its index exists; collective like `open_cache`."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (directory / INDEX).is_file():
        if time.monotonic() > deadline:
            raise CacheError(f"{directory}: the reference group wrote no eval cache within reference.timeout_s="
                             f"{timeout_s:g}s (the group scores them before the first training step; with TR-DPO, after each sync the run evaluates with)")
        time.sleep(0.2)
    return open_cache(directory, expected, progress=progress)


def cache_settings(cfg, outputs: tuple[str, ...], features=None) -> dict:
    """Every option that changes the cached numbers (data/tokenisation settings are in the data part)."""
    settings = {"outputs": list(outputs), "precision": cfg.train.precision}
    length = batch_length(cfg)
    if length is not None:  # a model whose numbers depend on the padded length (sparsepo.padding)
        settings["batch_length"] = length
    if "topk_ids" in outputs:
        settings["topk"] = cfg.reference.topk
    if features is not None:
        settings.update(sae=features.fingerprint, layer=features.layer, k=features.k)
        if getattr(features, "pool", "response") != "response":  # keyed only when set: older caches stay valid
            settings["pool"] = features.pool
    settings.update(scorer_for(cfg, outputs).fingerprints())  # SePO: both oracle models (checked first)
    return settings


def check_scorer_tokenizers(cfg, outputs: tuple[str, ...], *, samples: bool = False) -> None:
    """Refuse, before any weights load, a model that would score the run's tokens with another
    tokenizer than the run's (`config.paths.run_tokenizer`), naming both: the run's scorer
    (`scorers.scorer_for`: the reference, which FPO's SAE reads too, or SePO's oracle pair). The one
    check cache, inline, live and precompute all run."""
    scorer_for(cfg, outputs, samples=samples).check()


def load_scorer(cfg, outputs: tuple[str, ...], device):
    """What scores `outputs` in cache and inline modes (`scorers.scorer_for(...).load`): the frozen
    reference's `Head`, or SePO's oracle pair (which loads no reference model at all)."""
    return scorer_for(cfg, outputs).load(device)


def local_components(cfg, data_fingerprint: str, outputs: tuple[str, ...], features=None) -> dict:
    ref = reference_path(cfg)
    return fingerprint_components(model_dir=ref, tokenizer_dir=run_tokenizer(cfg), data=data_fingerprint,
                                  settings=cache_settings(cfg, outputs, features))


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
        # one writer per cache directory: a second precompute (or cache-mode run) into it is refused
        on_one_rank(lambda: acquire_run_lock(directory, setting="reference.cache_dir"))
        try:
            if ctx.is_main:
                log.info("reference cache %s missing: scoring %d pairs with %s", directory, len(dataset),
                         scorer_for(cfg, outputs).name)
            scorer = load_scorer(cfg, outputs, ctx.device)
            precompute_cache(scorer, dataset, collate, cache_dir=directory, components=expected, outputs=outputs,
                             topk=cfg.reference.topk, batch_size=cfg.reference.batch_size,
                             shard_size=cfg.reference.shard_size, rank=ctx.rank, world_size=ctx.world_size,
                             device=ctx.device, features=features, progress=cfg.logging.progress)
            del scorer
        finally:
            release_run_dir(directory)
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
