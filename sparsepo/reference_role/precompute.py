"""`sparsepo precompute`: score the whole dataset with the frozen reference into the verified cache.

    sparsepo precompute --config run.yaml [--nproc N]      # = sparsepo.train with reference.mode=precompute

The same reference code as training without the policy: shards split over the ranks, the index
written last by rank 0. A later `train` in cache mode (the default) reads it.
"""

from __future__ import annotations

import logging

from sparsepo.config import RunConfig
from sparsepo.engine.dist import init_distributed
from sparsepo.losses import get_method
from sparsepo.reference_role import offline
from sparsepo.preflight import preflight
from sparsepo.rundata import load_run_data
from sparsepo.rundir import release_run_dir

log = logging.getLogger("sparsepo")


def precompute(cfg: RunConfig) -> dict:
    ctx = init_distributed()
    spec = get_method(cfg.method.name, cfg.method.params)
    features = preflight(cfg, spec, ctx, training=False).features  # the stage file too: training follows
    data = load_run_data(cfg, ctx)
    outputs = spec.reference_outputs
    if outputs:
        offline.ensure_cache(cfg, outputs, data.dataset, data.collate, data_fingerprint=data.fingerprint, ctx=ctx,
                             features=features, force=True)
    else:
        log.info("method '%s' needs nothing from the reference: no cache to precompute", spec.name)
    release_run_dir(data.run_dir)
    return {"cache": str(offline.cache_dir(cfg)) if outputs else None, "pairs": len(data.dataset)}
