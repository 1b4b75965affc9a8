"""SPO: Sharifnassab et al. 2024, "Soft Preference Optimization: Aligning Language Models to Expert
Distributions" (arXiv 2405.00747), §3: the SPO loss (preference loss + β·KL regulariser)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import check, make_output, masked_mean, masked_sum, sigmoid_loss
from sparsepo.losses.kl import ESTIMATORS, GRADIENTS, SUPPORTS, token_kl
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
    token only: unbiased only on fresh samples, y_t ~ πθ; refused with stale ones, `stale_sample_problem`)."""
    kl_support: str = "policy"
    """topk_tail's bins: "policy" (the policy's top-K at each sample position, K = reference.topk) or
    "union" (∪ the reference's top-K: a tighter bound, twice the gathered ids)."""
    kl_gradient: str = "score_function"
    """k1/k3 only: "score_function" (adds the REINFORCE term so E[∇] = ∇KL_t, default) or "pathwise"
    (plain autograd of the sampled value; for k3 that is ∇KL(πref ‖ πθ), for k1 zero in expectation)."""
    kl_reduction: str = "sequence"
    """How per-token KLs become one number: "sequence" (Σ over each sample's tokens, mean over
    samples: the sequence-level KL, default) or "token_mean" (mean over all sample tokens)."""

    def __post_init__(self) -> None:
        check(self.alpha > 0, "SPOParams", f"alpha must be > 0 (got {self.alpha})")
        check(self.beta >= 0, "SPOParams", f"beta must be >= 0 (got {self.beta}); 0 drops the KL term")
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
    the policy's drift over s steps, no importance weight over prefixes). k1/k3 would in addition be
    off-policy at the token: y_t ~ π_old, and neither the value nor the score-function term carries
    πθ(y_t)/π_old(y_t); π_old's log-probs are not kept with a round, so that ratio cannot be formed
    and the combination is refused before training (`stale_sample_problem`, the config's check).

    Reads: policy_chosen_logps, policy_rejected_logps (B,); sample_mask (S,T') on generated tokens;
    policy_/ref_sample_topk_logps (S,T',K) both sides' log-probs at the same support ids;
    policy_/ref_sample_token_logps (S,T') at the sampled tokens. Rewards α·log πθ(y) (B,).
    Metrics: preference_loss, kl_term (β·KL) and sample_kl (the KL estimate).
    """
    pw, pl, mask, ref, pol, ref_tok, pol_tok = inputs.require(
        "spo", "policy_chosen_logps", "policy_rejected_logps", "sample_mask", "ref_sample_topk_logps",
        "policy_sample_topk_logps", "ref_sample_token_logps", "policy_sample_token_logps")
    if mask.shape[0] == 0:
        raise ValueError("method 'spo' needs at least one policy sample: sample_mask has S=0 rows.")
    per_token = token_kl(params.kl_estimator, policy_support_logps=pol, ref_support_logps=ref,
                         policy_token_logps=pol_tok, ref_token_logps=ref_tok, gradient=params.kl_gradient)
    if params.kl_reduction == "sequence":
        kl = masked_sum(per_token, mask).mean()
    else:
        kl = masked_mean(per_token.flatten(), mask.flatten())
    chosen, rejected = params.alpha * pw, params.alpha * pl
    preference = sigmoid_loss(chosen - rejected)
    losses = preference + params.beta * kl.to(preference.dtype)
    return make_output(losses, chosen, rejected, sample_kl=kl, kl_term=params.beta * kl,
                       preference_loss=preference.mean())


def stale_sample_problem(params, *, staleness: int, every_steps: int) -> str | None:
    """Why `params` (SPOParams, or a combination holding SPO's fields) cannot run on stale samples, in
    words that name the settings and the fix; None when it can. k1/k3 estimate KL_t from the sampled
    token, which is unbiased only when y_t ~ πθ; a stale round was drawn by an older policy and the
    importance ratio πθ/π_old is not available (see `spo_loss`)."""
    estimator = getattr(params, "kl_estimator", None)
    if estimator not in ("k1", "k3") or (staleness < 1 and every_steps <= 1):
        return None
    return (f"method.kl_estimator={estimator} needs fresh samples (y_t ~ the current policy), but "
            f"generation.staleness={staleness} and generation.every_steps={every_steps} regularise a step with "
            f"samples an older policy drew, and the importance ratio πθ/π_old is not kept: use "
            f"method.kl_estimator=topk_tail (exact at each visited prefix), or generation.staleness=0 and "
            f"generation.every_steps=1")
