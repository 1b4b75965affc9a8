"""FPO: Yin et al. 2024, "Direct Preference Optimization Using Sparse Feature-Level Constraints"
(arXiv 2411.07618), Eqs. 9–11."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepo.losses.common import check, make_output, pooled_union_mse, response_lengths, sigmoid_loss
from sparsepo.losses.types import LossInputs, LossOutput

POOLS = ("response", "predicting_states")
"""The same names as `sparsepo.sae.features.POOLS` (losses import torch only, so they are repeated)."""
INDEX_SETS = ("union", "policy_topk")


@dataclass(kw_only=True)
class FPOParams:
    beta: float = 0.1
    """β: scale of the length-normalised rewards and of the feature-distance terms (paper 0.1)."""
    alpha: float = 0.5
    """α: weight of the feature-level constraint (paper 0.5); 0 gives SimPO with margin γ_ref."""
    k: int = 50
    """Top-k SAE features per response on each side (paper 50). The reference side must store exactly
    min(k, F) ids (all F with index_set=policy_topk); D_F is normalised by k."""
    pool: str = "response"
    """Which layer-ℓ states are average-pooled into c̄: "response" (default: the response tokens' own
    states) or "predicting_states" (the states that predict them, one position earlier, as the
    official code; both averaged over |y|). Applied alike on both sides (`sae.features.pooling_mask`)."""
    index_set: str = "union"
    """Where D_F compares: "union" (default: I = topk(c̄θ) ∪ the reference's stored top-k, the
    reference 0 outside it; what an O(k) cache can hold) or "policy_topk" (the official code: the
    policy's top-k, the reference read densely at those ids; the reference serves all F pooled
    features, so reference.mode=inline only, `mode_problem`)."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "FPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.alpha >= 0, "FPOParams", f"alpha must be >= 0 (got {self.alpha})")
        check(isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1, "FPOParams",
              f"k must be an integer >= 1 (got {self.k!r})")
        check(self.pool in POOLS, "FPOParams", f"pool must be one of {', '.join(POOLS)} (got {self.pool!r})")
        check(self.index_set in INDEX_SETS, "FPOParams",
              f"index_set must be one of {', '.join(INDEX_SETS)} (got {self.index_set!r})")


def mode_problem(params, mode: str) -> str | None:
    """Why FPO with `params` cannot run with reference.mode `mode`, naming the keys and the fix; None
    when it can. index_set=policy_topk reads the reference's pooled features at the policy's top-k ids,
    known only inside the step: the inline reference serves all F of them; a cache holds O(k) numbers
    per response and the live group's wire carries the reference's own top-k, so both refuse."""
    if getattr(params, "index_set", "union") != "policy_topk" or mode == "inline":
        return None
    return (f"method.index_set=policy_topk reads the reference's SAE features at the policy's top-k ids, which "
            f"exist only inside the step; reference.mode={mode} serves the reference's own top-k (an O(k) "
            f"cache, or the live group's wire): use reference.mode=inline, or method.index_set=union")


def fpo_loss(inputs: LossInputs, params: FPOParams) -> LossOutput:
    """FPO: SimPO-style rewards, an offline reference margin, and a sparse SAE-feature constraint.

        r(y)   = β/|y|·log πθ(y),   r_ref(y) = β/|y|·log πref(y),   γ_ref = r_ref(yw) − r_ref(yl)
        D_F(y) = (1/k)·Σ_{i∈I} (c̄θ,i − c̄ref,i)²,   I = topk(c̄θ) ∪ topk(c̄ref)
        loss   = −log σ(r(yw) − r(yl) − γ_ref − α·(β·D_F(yl) − sg(β·D_F(yw))))

    c̄ are layer-ℓ SAE activations average-pooled over the response tokens; the reference keeps only
    its top-k (values outside it are 0). Yin et al. 2024 (arXiv 2411.07618), Eqs. 9–11. Defaults
    β=0.1, α=0.5, k=50. α=0 is SimPO with margin γ_ref. D_F(yw) is a stop-gradient, so the loss has
    no gradient w.r.t. policy_chosen_features. With index_set="policy_topk":
    D_F(y) = (1/k)·Σ_{i∈topk(c̄θ)} (c̄θ,i − c̄ref,i)², the reference dense (all F features given).

    Against the official code (MikaStars39/FeatureAlignment, feature_alignment/model/fpo.py): the
    logit, β·(Δ of per-token average log-ratios) − β·α·(D_F(yl) − sg(D_F(yw))), is the same. It
    differs in (1) the index set: the policy's top-k with the reference gathered densely there, mean
    over k (here `index_set`; the union default lets a cache store O(k) numbers, and counts the
    reference's top features the policy dropped); (2) pooling: the states at positions t−1 that
    predict response tokens (`pool="predicting_states"`), summed and divided by the padded length
    T−1, not |y| — its c̄ is |y|/(T−1) times ours and its D_F (|y|/(T−1))² times ours, so it depends
    on the batch's padding, which we do not copy (both pools here divide by |y|); (3) the layer: it
    encodes `hidden_states[-1]` (after the final norm) with a JumpReLU SAE (`load_jump_relu_sae`)
    trained on a middle layer's residual stream (layer 25, per the review in issue 24), a mismatch of
    layers; here the SAE reads the residual output of decoder layer
    `sae.layer`, the stream it was trained on, of any sae-lens type; (4) its reference is a live
    model in the same step (our inline mode); (5) its logged rewards add D_F to the log-ratio margin.

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
    dense = params.index_set == "policy_topk"
    width = fw.shape[-1] if dense else min(params.k, fw.shape[-1])
    for name, ids in (("ref_chosen_feature_ids", idw), ("ref_rejected_feature_ids", idl)):
        if ids.shape[-1] != width:
            want = "all F features (index_set=policy_topk reads the reference at the policy's ids)" if dense \
                else f"k={params.k} (capped at F={fw.shape[-1]})"
            raise ValueError(f"method 'fpo': {name} has {ids.shape[-1]} ids per response but {want} wants {width}: "
                             f"set method.k / method.index_set to what the reference serves, or re-score it.")
    len_w, len_l = response_lengths(mw), response_lengths(ml)
    chosen = params.beta * (pw - rw) / len_w
    rejected = params.beta * (pl - rl) / len_l
    distance = policy_topk_mse if dense else pooled_union_mse
    mse_w, union_w = distance(fw.detach(), idw, vw, params.k)
    mse_l, union_l = distance(fl, idl, vl, params.k)
    logits = (chosen - rejected) - params.alpha * (params.beta * mse_l - params.beta * mse_w)
    union_size = torch.cat([union_w, union_l]).to(chosen.dtype).mean()
    return make_output(sigmoid_loss(logits), chosen, rejected, feature_mse_chosen=mse_w.mean(),
                       feature_mse_rejected=mse_l.mean(), union_size=union_size)


def policy_topk_mse(policy_features, ref_ids, ref_values, k: int):
    """The official code's D_F = (1/k)·Σ_{i∈topk(c̄θ)} (c̄θ,i − c̄ref,i)² with the reference dense
    (ref_ids (B,F) covering every feature): returns mse (B,) and the index-set size (B,) long (= min(k, F))."""
    ref_dense = torch.zeros_like(policy_features).scatter_add(1, ref_ids, ref_values.to(policy_features.dtype))
    top = policy_features.detach().topk(min(k, policy_features.shape[1]), dim=-1).indices
    diff = policy_features.gather(1, top) - ref_dense.gather(1, top)
    return (diff * diff).sum(-1) / k, torch.full(top.shape[:1], top.shape[1], dtype=torch.long, device=top.device)
