"""SPO: Sharifnassab et al. 2024, "Soft Preference Optimization: Aligning Language Models to Expert
Distributions" (arXiv 2405.00747), §3: the SPO loss (preference loss + β·KL regulariser)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import check, make_output, masked_mean, masked_sum, sigmoid_loss
from sparsepo.losses.kl import ESTIMATORS, GRADIENTS, SUPPORTS, importance_ratio, token_kl
from sparsepo.losses.types import LossInputs, LossOutput

KL_REDUCTIONS = ("sequence", "token_mean")


@dataclass(kw_only=True)
class SPOParams:
    alpha: float = 1.0
    """α: the softmax exponent; the preference loss is −log softmax over {yw, yl} of α·log πθ(y)."""
    beta: float = 0.1
    """β: weight of KL(πθ ‖ πref) on policy samples (our default; its scale depends on kl_reduction)."""
    kl_estimator: str = "topk_tail"
    """How each per-token KL_t is estimated (sparsepo.losses.kl): "topk_tail" (default: the policy's
    top-K bins + a tail bin, a deterministic lower bound, exact at K = V), "k1" or "k3" (the sampled
    token: unbiased on fresh samples, y_t ~ πθ; on a stale round each token is weighted by the importance
    ratio πθ/π_old, capped at is_clip: `sparsepo.losses.kl`)."""
    kl_support: str = "policy"
    """topk_tail's bins: "policy" (the policy's top-K at each sample position, K = reference.topk) or
    "union" (∪ the reference's top-K: a tighter bound, twice the gathered ids)."""
    kl_gradient: str = "score_function"
    """k1/k3 only: "score_function" (adds the REINFORCE term so E[∇] = ∇KL_t, default) or "pathwise"
    (plain autograd of the sampled value; for k3 that is ∇KL(πref ‖ πθ), for k1 zero in expectation)."""
    is_clip: float = 5.0
    """k1/k3 on stale samples: the cap c on the importance ratio ρ_t = πθ(y_t)/π_old(y_t). Exact while
    every ρ_t ≤ c; a token the policy now likes more than c times better than the drawing policy did is
    under-weighted (bias towards 0, bounded variance). With staleness of a few steps ρ stays near 1;
    5 leaves ordinary drift uncapped and stops a rare token from dominating a batch. Logged:
    sample_is_ratio (mean ρ before the cap) and sample_is_clipped (fraction capped)."""
    kl_reduction: str = "sequence"
    """How per-token KLs become one number: "sequence" (Σ over each sample's tokens, mean over
    samples: the sequence-level KL, default) or "token_mean" (mean over all sample tokens)."""

    def __post_init__(self) -> None:
        check(self.alpha > 0, "SPOParams", f"alpha must be > 0 (got {self.alpha})")
        check(self.beta >= 0, "SPOParams", f"beta must be >= 0 (got {self.beta}); 0 drops the KL term")
        check(self.is_clip >= 1, "SPOParams", f"is_clip must be >= 1 (got {self.is_clip}): a cap below 1 "
                                              f"would shrink even the ratios of an unchanged policy")
        for name, choices in (("kl_estimator", ESTIMATORS), ("kl_support", SUPPORTS), ("kl_gradient", GRADIENTS),
                              ("kl_reduction", KL_REDUCTIONS)):
            value = getattr(self, name)
            check(value in choices, "SPOParams", f"{name} must be one of {', '.join(choices)} (got {value!r})")


def spo_loss(inputs: LossInputs, params: SPOParams) -> LossOutput:
    """SPO: a reference-free soft preference loss plus a KL regulariser over the policy's own outputs.

        loss_pair = −log σ(α·(log πθ(yw) − log πθ(yl)))          (= −log softmax_α over {yw, yl})
        KL        = E_{y~πθ} Σ_t KL(πθ(·|x,y<t) ‖ πref(·|x,y<t))   on S policy samples
        loss      = loss_pair + β·KL                             (KL is one batch scalar, added to every pair)

    Sharifnassab et al. 2024 (arXiv 2405.00747), §3, the SPO objective. Defaults α=1.0, β=0.1,
    kl_estimator="topk_tail", kl_support="policy", kl_reduction="sequence".

    Reading of the regulariser: the paper's KL is between the policy's and the reference's whole
    output distributions, taken where the policy puts its mass. By the chain rule that sequence-level
    KL is E_{y~πθ}[Σ_t KL_t], each KL_t over the vocabulary at a prefix of a policy sample; we
    estimate it on the policy's samples (`kl_reduction="sequence"`: Σ_t per sample, mean over
    samples; "token_mean" is the per-token average). Each KL_t comes from `sparsepo.losses.kl`
    (`kl_estimator`): the default "topk_tail" bins on the POLICY's top-K — the reference's top-K
    alone would miss exactly the mass the regulariser exists to penalise (policy mass where the
    reference has little) — and is a deterministic lower bound, exact at K = V; "k1"/"k3" are
    unbiased sampled-token estimates with a score-function gradient — on fresh samples only. Prefixes
    are treated as data (no gradient through the sampling of y<t).

    Stale samples (`generation.staleness` s ≥ 1, or `generation.every_steps` > 1: a round drawn by
    an older policy π_old regularises a later step). topk_tail is then still KL_t itself at each
    visited prefix (it sums over the vocabulary's bins, no sampled token), but the prefixes come from
    π_old, not πθ: the sequence-level KL is estimated on π_old's prefix distribution (bias of order
    the policy's drift over s steps, no importance weight over prefixes). k1/k3 are in addition
    off-policy at the token (y_t ~ π_old): the round keeps π_old's log-prob of each sampled token
    (`old_sample_token_logps`, taken when it was drawn) and each token's estimate, value and
    score-function term, is weighted by ρ_t = πθ(y_t)/π_old(y_t), detached and capped at is_clip —
    unbiased for KL_t at each visited prefix while no ratio is capped (`sparsepo.losses.kl`).

    Reads: policy_chosen_logps, policy_rejected_logps (B,); sample_mask (S,T') on generated tokens;
    policy_/ref_sample_topk_logps (S,T',K) both sides' log-probs at the same support ids;
    policy_/ref_sample_token_logps (S,T') at the sampled tokens; old_sample_token_logps (S,T') or None
    (fresh samples). Rewards α·log πθ(y) (B,).
    Metrics: preference_loss, kl_term (β·KL) and sample_kl (the KL estimate); on a stale round with
    k1/k3, sample_is_ratio and sample_is_clipped.
    """
    pw, pl, mask, ref, pol, ref_tok, pol_tok = inputs.require(
        "spo", "policy_chosen_logps", "policy_rejected_logps", "sample_mask", "ref_sample_topk_logps",
        "policy_sample_topk_logps", "ref_sample_token_logps", "policy_sample_token_logps")
    if mask.shape[0] == 0:
        raise ValueError("method 'spo' needs at least one policy sample: sample_mask has S=0 rows.")
    ratio, extra = None, {}
    old = inputs.old_sample_token_logps
    if old is not None and params.kl_estimator in ("k1", "k3"):
        raw = importance_ratio(pol_tok, old, float("inf"))
        ratio = raw.clamp(max=params.is_clip)
        extra = dict(sample_is_ratio=masked_mean(raw.flatten(), mask.flatten()),
                     sample_is_clipped=masked_mean((raw > params.is_clip).to(raw.dtype).flatten(), mask.flatten()))
    per_token = token_kl(params.kl_estimator, policy_support_logps=pol, ref_support_logps=ref,
                         policy_token_logps=pol_tok, ref_token_logps=ref_tok, gradient=params.kl_gradient,
                         ratio=ratio)
    if params.kl_reduction == "sequence":
        kl = masked_sum(per_token, mask).mean()
    else:
        kl = masked_mean(per_token.flatten(), mask.flatten())
    chosen, rejected = params.alpha * pw, params.alpha * pl
    preference = sigmoid_loss(chosen - rejected)
    losses = preference + params.beta * kl.to(preference.dtype)
    return make_output(losses, chosen, rejected, sample_kl=kl, kl_term=params.beta * kl,
                       preference_loss=preference.mean(), **extra)

