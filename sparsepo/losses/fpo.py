"""FPO: Yin et al. 2024, "Direct Preference Optimization Using Sparse Feature-Level Constraints"
(arXiv 2411.07618), Eqs. 9–11."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepo.losses.common import check, make_output, pooled_union_mse, response_lengths, sigmoid_loss
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class FPOParams:
    beta: float = 0.1
    """β: scale of the length-normalised rewards and of the feature-distance terms (paper 0.1)."""
    alpha: float = 0.5
    """α: weight of the feature-level constraint (paper 0.5); 0 gives SimPO with margin γ_ref."""
    k: int = 50
    """Top-k SAE features per response on each side (paper 50). The reference side must store exactly
    min(k, F) ids; D_F is normalised by k."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "FPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.alpha >= 0, "FPOParams", f"alpha must be >= 0 (got {self.alpha})")
        check(isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1, "FPOParams",
              f"k must be an integer >= 1 (got {self.k!r})")


def fpo_loss(inputs: LossInputs, params: FPOParams) -> LossOutput:
    """FPO: SimPO-style rewards, an offline reference margin, and a sparse SAE-feature constraint.

        r(y)   = β/|y|·log πθ(y),   r_ref(y) = β/|y|·log πref(y),   γ_ref = r_ref(yw) − r_ref(yl)
        D_F(y) = (1/k)·Σ_{i∈I} (c̄θ,i − c̄ref,i)²,   I = topk(c̄θ) ∪ topk(c̄ref)
        loss   = −log σ(r(yw) − r(yl) − γ_ref − α·(β·D_F(yl) − sg(β·D_F(yw))))

    c̄ are layer-ℓ SAE activations average-pooled over the response tokens; the reference keeps only
    its top-k (values outside it are 0). Yin et al. 2024 (arXiv 2411.07618), Eqs. 9–11. Defaults
    β=0.1, α=0.5, k=50. α=0 is SimPO with margin γ_ref. D_F(yw) is a stop-gradient, so the loss has
    no gradient w.r.t. policy_chosen_features.

    Reads: policy_{chosen,rejected}_logps and ref_{chosen,rejected}_logps (B,); chosen_mask,
    rejected_mask (B,T) for |y|; policy_{chosen,rejected}_features (B,F); ref_{chosen,rejected}_
    feature_ids (B,k) long and ref_{chosen,rejected}_feature_values (B,k).
    Rewards: r(y) − r_ref(y) = β/|y|·(log πθ(y) − log πref(y)), (B,), so the margin metric is the
    preference term of the logit. Metrics: feature_mse_chosen, feature_mse_rejected (mean D_F),
    union_size (mean |I| over all responses).
    """
    (pw, pl, rw, rl, mw, ml, fw, fl, idw, vw, idl, vl) = inputs.require(
        "fpo", "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
        "chosen_mask", "rejected_mask", "policy_chosen_features", "policy_rejected_features",
        "ref_chosen_feature_ids", "ref_chosen_feature_values",
        "ref_rejected_feature_ids", "ref_rejected_feature_values")
    width = min(params.k, fw.shape[-1])
    for name, ids in (("ref_chosen_feature_ids", idw), ("ref_rejected_feature_ids", idl)):
        if ids.shape[-1] != width:
            raise ValueError(f"method 'fpo': {name} has {ids.shape[-1]} ids per response but k={params.k} "
                             f"(capped at F={fw.shape[-1]}) wants {width}: set method.k to the reference "
                             f"cache's top-k, or re-score the reference with this k.")
    len_w, len_l = response_lengths(mw), response_lengths(ml)
    chosen = params.beta * (pw - rw) / len_w
    rejected = params.beta * (pl - rl) / len_l
    mse_w, union_w = pooled_union_mse(fw.detach(), idw, vw, params.k)
    mse_l, union_l = pooled_union_mse(fl, idl, vl, params.k)
    logits = (chosen - rejected) - params.alpha * (params.beta * mse_l - params.beta * mse_w)
    union_size = torch.cat([union_w, union_l]).to(chosen.dtype).mean()
    return make_output(sigmoid_loss(logits), chosen, rejected, feature_mse_chosen=mse_w.mean(),
                       feature_mse_rejected=mse_l.mean(), union_size=union_size)
