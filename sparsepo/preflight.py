"""Preflight: every check that can refuse a run, before the expensive work (tokenising the data,
precomputing the reference cache, building the engine). Cheap checks first:

1. the DeepSpeed stage file (deepspeed.stage_file exists, parses, holds no "auto") and the JSON
   built from it, and the batch split over this world (training only);
   (the method's needs and the topology were checked when the config loaded, and by run_live);
2. the checkpoint to resume from: valid (checkpoint.find_resume) and written by a compatible config
   and global batch (the data fingerprint is compared by checkpoint.restore once the data is
   tokenised, still before the cache);
3. the SAE itself, checked against the reference model it must have been trained on.

    pre = preflight(cfg, spec, ctx)                   # trainer.setup, first thing after the world
    pre = preflight(cfg, spec, ctx, training=False)   # `sparsepo precompute`: stage file, SAE
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsepo import checkpoint as ckpt
from sparsepo.config import RunConfig, build_deepspeed_config, check_batch_size


@dataclass(frozen=True)
class Preflight:
    ds_config: dict  # the policy engine's DeepSpeed JSON
    resume: Path | None  # the verified checkpoint to continue from, or None
    features: Any  # the checked SAEFeatures, or None


def preflight(cfg: RunConfig, spec, ctx, *, training: bool = True) -> Preflight:
    ds_config = build_deepspeed_config(cfg, dp_size=ctx.world_size)  # reads and checks the stage file
    if training:
        check_batch_size(cfg, ctx.world_size)
    resume = ckpt.find_resume(cfg) if training else None
    if resume is not None:  # config and global batch now; the data fingerprint once it is known
        ckpt.check_compatible(resume, cfg, data_fingerprint=ckpt.read_meta(resume)["data"],
                              world_size=ctx.world_size)
    from sparsepo.rundata import load_features

    return Preflight(ds_config=ds_config, resume=resume, features=load_features(cfg, spec))
