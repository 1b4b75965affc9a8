"""The SAE runtime: FPO's SAE features on both sides, and `sparsepo sae train`.

The same object serves the reference scorer (pooled top-k ids/values per response, into the cache)
and the policy (dense pooled features with gradients, for the feature MSE). Both capture layer ℓ
during the forward that already computes the log-probs, so FPO adds no second forward.

    sparsepo sae train --config run.yaml --out runs/sae-l1     # train an SAE on the reference's layer ℓ
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sparsepo.sae.features import pooled_features, pooling_mask, reconstruction_stats, sparse_topk
from sparsepo.sae.hooks import capture_residual, collect_activations
from sparsepo.sae.io import check_sae_compatible, load_sae, sae_fingerprint, save_sae
from sparsepo.sae.train import train_sae

log = logging.getLogger("sparsepo")


class SAEFeatures:
    """A frozen SAE reading decoder layer `layer`; k = FPO's top-k; `pool` which states are pooled
    (`features.pooling_mask`); `dense`: the reference serves every pooled feature (ids 0..F−1), for
    FPO's index_set=policy_topk, which reads the reference at the policy's top-k ids (inline only)."""

    outputs = ("feature_ids", "feature_values")
    pool, dense = "response", False

    def __init__(self, sae, *, layer: int, k: int, pool: str = "response", dense: bool = False):
        self.sae, self.layer, self.k, self.pool, self.dense = sae, layer, k, pool, dense
        self.fingerprint = sae_fingerprint(sae)

    @contextmanager
    def capture(self, model):
        with capture_residual(model, self.layer) as cap:
            yield cap

    @torch.no_grad()
    def reference(self, cap, batch) -> dict[str, torch.Tensor]:
        """The reference's FPO entries: pooled top-k (ids, values) per response, (2B,k); with `dense`
        all F pooled features, ids 0..F−1, (2B,F)."""
        pooled = pooled_features(self.sae, cap.take(), pooling_mask(batch.response_mask, self.pool))
        if self.dense:
            ids = torch.arange(pooled.shape[-1], device=pooled.device).expand(pooled.shape[0], -1)
            return {"feature_ids": ids, "feature_values": pooled}
        ids, values = sparse_topk(pooled, min(self.k, pooled.shape[-1]))
        return {"feature_ids": ids, "feature_values": values}

    def policy(self, cap, batch, *, stats: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Dense pooled policy features (2B,F) with gradients, and — with `stats` — SAE reconstruction
        quality on the policy's own activations (it drifts away from the reference's as training moves
        the policy). The statistics cost a second encode + decode, so the trainer asks for them on log
        steps only (`MetricsLogger.due`); when asked, they mean what they always did."""
        hidden = cap.take()
        pooled = pooled_features(self.sae, hidden, pooling_mask(batch.response_mask, self.pool))
        if not stats:
            return pooled, {}
        with torch.no_grad():
            got = reconstruction_stats(self.sae, hidden.detach(), batch.response_mask)
        return pooled, {"sae_explained_variance": float(got["explained_variance"]), "sae_l0": float(got["l0"])}


def model_shape(model_path: str) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return config.hidden_size, config.num_hidden_layers


def load_for_run(cfg, *, model_fingerprint: str | None = None) -> SAEFeatures:
    """The run's SAE, refused (through the one `check_sae_compatible`, in every mode) unless it fits
    the model's width and the configured layer, and — given the reference weights' fingerprint
    (`reference.cache.hash_files(dir, MODEL_FILES)`) — was trained on that model's activations."""
    sae = load_sae(cfg.sae.path, sae_id=cfg.sae.sae_id)
    d_model, num_layers = model_shape(cfg.model.path)
    check_sae_compatible(sae, d_model=d_model, layer=cfg.sae.layer, num_layers=num_layers,
                         model_fingerprint=model_fingerprint)
    params = cfg.method.params
    return SAEFeatures(sae, layer=cfg.sae.layer, k=params.k, pool=getattr(params, "pool", "response"),
                       dense=getattr(params, "index_set", "union") == "policy_topk")


def train_for_run(cfg, out_dir: str | Path, *, d_sae: int | None = None, k: int = 32, steps: int = 2000,
                  max_tokens: int = 200_000, architecture: str = "topk", batch_pairs: int = 16) -> dict:
    """Train an SAE on the reference model's layer-ℓ residuals over the run's prompts + responses,
    save it in the sae-lens format; returns explained variance, L0 and timings."""
    from sparsepo import data as pdata
    from sparsepo.config.paths import reference_path, run_tokenizer
    from sparsepo.models import check_same_tokens, load_frozen_model, load_tokenizer
    from sparsepo.reference.cache import MODEL_FILES, hash_files

    t0 = time.perf_counter()
    ref = reference_path(cfg)
    if ref != cfg.model.path:  # the SAE reads the reference: it must share the run's tokens
        check_same_tokens("SAE's model (the reference)", ref, run_tokenizer(cfg), cfg.model.path)
    tokenizer = load_tokenizer(run_tokenizer(cfg))
    dataset, _ = pdata.load_preference_dataset(cfg.data, tokenizer)
    model = load_frozen_model(ref)
    d_model, num_layers = model_shape(ref)
    if not 0 <= cfg.sae.layer < num_layers:
        raise ValueError(f"sae.layer={cfg.sae.layer} but {ref} has layers 0..{num_layers - 1}")
    batches = (pdata.collate_pairs(pdata.gather_rows(dataset, list(range(i, min(i + batch_pairs, len(dataset))))),
                                   tokenizer.pad_token_id) for i in range(0, len(dataset), batch_pairs))
    acts = collect_activations(model, batches, cfg.sae.layer, max_tokens=max_tokens,
                               progress=cfg.logging.progress)
    sae, stats = train_sae(acts, d_sae=d_sae or 8 * d_model, k=k, architecture=architecture, steps=steps,
                           seed=cfg.train.seed, progress=cfg.logging.progress)
    save_sae(sae, out_dir, layer=cfg.sae.layer, model_fingerprint=hash_files(ref, MODEL_FILES), stats=stats)
    stats = {**stats, "tokens": int(acts.shape[0]), "total_seconds": time.perf_counter() - t0, "out": str(out_dir)}
    log.info("SAE for %s layer %d: explained variance %.3f, L0 %.1f, %d tokens, %.1fs -> %s", ref, cfg.sae.layer,
             stats["explained_variance"], stats["l0"], stats["tokens"], stats["total_seconds"], out_dir)
    return stats
