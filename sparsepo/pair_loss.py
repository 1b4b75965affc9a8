"""One policy forward of a collated batch and the method's loss on it: the piece training and
evaluation share, so the loss maths is written once.

    out, fwd, feature_metrics = forward_loss(head, batch, ref, spec, params, eos_id=tok.eos_token_id)
"""

from __future__ import annotations

from contextlib import nullcontext

from sparsepo.losses.inputs import build_loss_inputs, eos_positions
from sparsepo.models import pair_forward


def forward_loss(head, batch, ref, spec, params, *, eos_id: int, features=None, sample_fields=None,
                 stats: bool = False, router_aux: bool = False):
    """The policy's forward of `batch` (chosen rows first) through its `head` (`logprobs.head.Head`;
    `router_aux`: an MoE policy's router loss too, `models.pair_forward`), and `spec.loss_fn` fed exactly what the
    method's flags ask for. `ref`: the reference outputs of this batch (None when reference-free);
    `features`: the SAE features object (FPO) or None, `stats` (log steps): also its reconstruction
    statistics and the policy's entropy / top-1 ids (`models.pair_forward`);
    `sample_fields`: SPO's sample fields. Returns (LossOutput, PairForward, SAE metrics)."""
    with features.capture(head.model) if features is not None else nullcontext() as cap:
        fwd = pair_forward(head, batch, sq_mass=spec.needs_sq_mass, router_aux=router_aux, logit_mean=True,
                           ids=ref.topk_ids if "topk_ids" in spec.reference_outputs else None, stats=stats)
    pooled, feature_metrics = features.policy(cap, batch, stats=stats) if features is not None else (None, {})
    eos = eos_positions(batch.input_ids, batch.response_mask, eos_id)
    out = spec.loss_fn(build_loss_inputs(spec, fwd, batch.response_mask, ref, pooled, sample_fields, eos), params)
    return out, fwd, feature_metrics
