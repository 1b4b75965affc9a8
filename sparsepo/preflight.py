"""Preflight: every check that can refuse a run, before the expensive work (precomputing the
reference cache, building the engine). Cheap checks first:

1. `preflight`, first thing after the world starts: the DeepSpeed stage file (deepspeed.stage_file
   exists, parses, holds no "auto") and the JSON built from it, the batch split over this world
   (training only), and the SAE, checked against the reference model it must have been trained on
   (the method's needs and the topology were checked when the config loaded, and by run_live);
2. `resume_point`, once the run directory is locked and the data tokenised (its fingerprint is
   known): the checkpoint to resume from, verified (checkpoint.find_resume), and written by the
   same config, data and global batch (checkpoint.check_compatible), before the engine is built.

    pre = preflight(cfg, spec, ctx)                   # trainer.setup
    resume = resume_point(cfg, ctx, data.fingerprint)
    pre = preflight(cfg, spec, ctx, training=False)   # `sparsepo precompute`: stage file, SAE
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsepo import checkpoint as ckpt
from sparsepo.config import ConfigError, RunConfig, build_deepspeed_config, check_batch_size
from sparsepo.config.device import check_device


@dataclass(frozen=True)
class Preflight:
    ds_config: dict  # the policy engine's DeepSpeed JSON
    features: Any  # the checked SAEFeatures, or None


def preflight(cfg: RunConfig, spec, ctx, *, training: bool = True) -> Preflight:
    facts = check_device(cfg)  # fp16 / flash-attention where the machine allows them
    ds_config = build_deepspeed_config(cfg, dp_size=ctx.world_size, cuda=facts["cuda"])  # reads the stage file
    if training:
        check_batch_size(cfg, ctx.world_size)
    if spec.needs_oracle_scores:  # SePO: oracle.json there, naming two distinct local models (no tokenising yet)
        from sparsepo.reference.oracle import OracleError, read_manifest

        try:
            read_manifest(cfg.reference.oracle)
        except OracleError as e:
            raise ConfigError(f"reference.oracle: {e}") from None
    from sparsepo.rundata import load_features

    return Preflight(ds_config=ds_config, features=load_features(cfg, spec))


def resume_point(cfg: RunConfig, ctx, data_fingerprint: str) -> Path | None:
    """The verified checkpoint to continue from (None: start fresh), refused now if this run cannot
    continue it exactly; checkpoint.restore repeats the check when it loads."""
    resume = ckpt.find_resume(cfg)
    if resume is not None:
        ckpt.check_compatible(resume, cfg, data_fingerprint=data_fingerprint, world_size=ctx.world_size)
    return resume
