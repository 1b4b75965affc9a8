"""Sparse-autoencoder features for FPO (2411.07618): hooks, pooled features, SAE train / save / load.

FPO holds the policy near the reference through an MSE between the *pooled* SAE feature
activations of layer ℓ's residual stream (the output of decoder layer ℓ, = sae-lens
`blocks.ℓ.hook_resid_post`), average-pooled over response tokens. The policy needs them with
gradients on every step; the reference side needs only their top-k (ids, values) per response.

    with capture_residual(model, layer) as cap:           # policy or reference forward
        model(input_ids=..., attention_mask=...)
    pooled = pooled_features(sae, cap.take(), response_mask)   # (N,F), differentiable
    ids, values = sparse_topk(pooled, k)                        # what the reference cache stores

Train an SAE for a model that has none (`sparsepo sae train` wraps this):

    acts = collect_activations(model, batches, layer)            # (M,D) response-token residuals
    sae, stats = train_sae(acts, d_sae=16 * D, k=32, steps=2000)
    save_sae(sae, out_dir, layer=layer, model_fingerprint=fp)    # sae-lens format + sidecar

Importing this package imports only torch: sae-lens costs 7–9 s and ~560 MB, so it (and
transformers) are imported inside the functions that need them.
"""

from sparsepo.sae.features import pooled_features, reconstruction_stats, sparse_topk
from sparsepo.sae.hooks import ResidualCapture, capture_residual, collect_activations, decoder_layers
from sparsepo.sae.io import (
    SIDECAR,
    check_sae_compatible,
    load_sae,
    sae_fingerprint,
    sae_hook_layer,
    save_sae,
)
from sparsepo.sae.train import train_sae

__all__ = [
    "SIDECAR",
    "ResidualCapture",
    "capture_residual",
    "check_sae_compatible",
    "collect_activations",
    "decoder_layers",
    "load_sae",
    "pooled_features",
    "reconstruction_stats",
    "sae_fingerprint",
    "sae_hook_layer",
    "save_sae",
    "sparse_topk",
    "train_sae",
]
