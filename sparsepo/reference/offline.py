"""Cache mode: fingerprint the reference inputs, precompute the cache when missing, open it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from sparsepo.reference.cache import INDEX, CacheReader, fingerprint_components
from sparsepo.reference.scorer import precompute_cache, required_outputs

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
    return settings


def local_components(cfg, data_fingerprint: str, outputs: tuple[str, ...], features=None) -> dict:
    ref = reference_path(cfg)
    return fingerprint_components(model_dir=ref, tokenizer_dir=cfg.model.tokenizer or ref, data=data_fingerprint,
                                  settings=cache_settings(cfg, outputs, features))


def components(cfg, data_fingerprint: str, outputs: tuple[str, ...], features=None) -> dict:
    """Computed on rank 0 and broadcast: every rank must key the cache identically (and only one
    rank reads the model files)."""
    box = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        box[0] = local_components(cfg, data_fingerprint, outputs, features)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def ensure_cache(cfg, spec, dataset, collate, *, data_fingerprint: str, rank: int, world_size: int,
                 device, features=None, force: bool = False) -> CacheReader | None:
    """Open the reference cache for this run, precomputing it first when it is missing."""
    outputs = required_outputs(spec)
    if not outputs:
        return None
    expected = components(cfg, data_fingerprint, outputs, features)
    recorded = (getattr(features.sae, "sparsepo_meta", None) or {}).get("model_fingerprint") if features else None
    if recorded and recorded != expected["model"]:
        raise ValueError(f"SAE {cfg.sae.path} was trained on activations of model {recorded}, not of the reference "
                         f"{reference_path(cfg)} ({expected['model']}): train one with `sparsepo sae train`")
    directory = cache_dir(cfg)
    if force or not (directory / INDEX).is_file():
        from sparsepo.models import load_frozen_model

        if rank == 0:
            log.info("reference cache %s missing: scoring %d pairs with %s", directory, len(dataset),
                     reference_path(cfg))
        model = load_frozen_model(reference_path(cfg), device=device, precision=cfg.train.precision)
        precompute_cache(model, dataset, collate, cache_dir=directory, components=expected, outputs=outputs,
                         topk=cfg.reference.topk, batch_size=cfg.reference.batch_size,
                         shard_size=cfg.reference.shard_size, rank=rank, world_size=world_size,
                         device=device, features=features, progress=cfg.logging.progress)
        del model
    return CacheReader(directory, expected)
