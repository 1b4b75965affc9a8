"""Per-token estimators of KL(πθ ‖ πref) on samples the policy generated (SPO's regulariser).

At each generated position t of a sample y ~ πθ, with prefix h = (x, y<t), the quantity is
KL_t = Σ_v πθ(v|h) (log πθ(v|h) − log πref(v|h)); by the chain rule the sequence-level KL of the
whole output distribution is E_{y~πθ} Σ_t KL_t. Three ways to estimate KL_t, all pure tensor code:

- "topk_tail": coarsen both distributions onto a support of K ids plus one tail bin (`sparse_kl`).
  The support is the POLICY's top-K at h (optionally ∪ the reference's top-K, duplicates dropped),
  so the bins see where the policy puts its mass even when the reference puts little there. A
  lower bound of KL_t (data-processing inequality), exact when the support holds all mass (K = V);
  a finer support (the union) can only raise it. Deterministic given h: no sampling variance at t.
- "k1": log πθ(y_t|h) − log πref(y_t|h) on the sampled token; unbiased when y_t ~ πθ(·|h), can be
  negative per token.
- "k3": (r − 1) − log r with r = πref(y_t|h)/πθ(y_t|h) (Schulman 2020); unbiased when y_t ~ πθ(·|h),
  ≥ 0 per token, lower variance than k1 when the two are close.

k1 and k3 are unbiased as they stand only on fresh samples. On a round drawn by an older policy π_old
(SPO with `generation.staleness` ≥ 1 or `every_steps` > 1) y_t ~ π_old(·|h), and `token_kl` weights
each token's estimate (value and score-function term alike) by the importance ratio
ρ_t = πθ(y_t|h)/π_old(y_t|h), detached and capped at `is_clip`:
E_{y_t~π_old}[ρ_t·(v + sg(v)·(lp − sg(lp)))] = E_{y_t~πθ}[…], so value and gradient are those of fresh
samples at each visited prefix, exactly when no ratio exceeds the cap (a capped token is under-weighted:
a bias towards 0 traded for bounded variance, the truncated importance sampling of Ionides 2008). The
ratio is per token, not per sequence: KL_t is a conditional expectation at a fixed prefix, so the token's
own ratio is the exact correction, and the product over a sequence's tokens (which would also reweight
the prefixes) has variance exponential in its length. The prefixes still come from π_old (as for
topk_tail, which needs no sampled token and stays KL_t at each visited prefix): a bias of the order
of the policy's drift over the staleness, not corrected.

Gradients. For topk_tail, autograd at the fixed prefix is ∇KL_t exactly (up to the coarsening).
For the sampled estimators the value depends on which token was drawn, so plain autograd is not
∇KL_t: for k1 it is ∇log πθ(y_t), zero in expectation; for k3 it is (1−r)∇log πθ(y_t), whose
expectation is ∇KL(πref ‖ πθ), the other direction. `kl_gradient="score_function"` (default) adds
the score-function term, value + sg(value)·(log πθ(y_t) − sg(log πθ(y_t))), whose gradient has
expectation ∇KL_t for both k1 and k3 (checked exactly in tests/test_spo_kl.py). Prefixes are held
fixed for every estimator (the samples are data, as in on-policy distillation); the score term of
the prefix distribution (a reward-to-go over later tokens) is not included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo.losses.common import _upcast, sparse_kl

ESTIMATORS = ("topk_tail", "k1", "k3")
SUPPORTS = ("policy", "union")
GRADIENTS = ("score_function", "pathwise")
EMPTY_BIN = -1e4
"""Log-prob written into a support slot that must hold no mass (a duplicate id of the union):
exp(-1e4) is exactly 0 in float32/64, and p − q = 0 there, so the slot adds nothing and has no
gradient (an -inf would make 0·(−inf − −inf) = nan in the backward pass)."""


def union_support(policy_ids: Tensor, ref_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """The support ids at each position and which slots count: (…,K) [, (…,K')] -> ids (…,K+K'), keep.

    Without `ref_ids` the support is the policy's top-K (all slots kept). With them, reference ids
    already among the policy's are marked not kept (each id counts once, so no mass is counted twice).
    """
    if ref_ids is None:
        return policy_ids, torch.ones(policy_ids.shape, dtype=torch.bool, device=policy_ids.device)
    dup = (ref_ids.unsqueeze(-1) == policy_ids.unsqueeze(-2)).any(-1)
    # an id repeated inside ref_ids (only possible at masked positions, ids 0) also counts once
    first = torch.ones_like(dup)
    if ref_ids.shape[-1] > 1:
        earlier = (ref_ids.unsqueeze(-1) == ref_ids.unsqueeze(-2)).tril(-1).any(-1)
        first = ~earlier
    keep = torch.cat([torch.ones_like(policy_ids, dtype=torch.bool), ~dup & first], -1)
    return torch.cat([policy_ids, ref_ids], -1), keep


def mask_support(logps: Tensor, keep: Tensor) -> Tensor:
    """Log-probs at the support ids with slots that do not count set to `EMPTY_BIN` (no mass, no grad)."""
    return torch.where(keep, logps, torch.full((), EMPTY_BIN, dtype=logps.dtype, device=logps.device))


def topk_tail_kl(policy_support_logps: Tensor, ref_support_logps: Tensor) -> Tensor:
    """KL_t on the support bins + tail: (…,K), (…,K) -> (…). A lower bound, exact when K = V."""
    return sparse_kl(policy_support_logps, ref_support_logps)


def k1(policy_token_logps: Tensor, ref_token_logps: Tensor) -> Tensor:
    """log πθ(y_t) − log πref(y_t): unbiased for KL_t when y_t ~ πθ(·|h). Shapes (…) -> (…)."""
    return policy_token_logps - ref_token_logps


def k3(policy_token_logps: Tensor, ref_token_logps: Tensor) -> Tensor:
    """(r − 1) − log r, r = πref(y_t)/πθ(y_t): unbiased for KL_t, ≥ 0. Shapes (…) -> (…)."""
    log_r = ref_token_logps - policy_token_logps
    return torch.expm1(log_r) - log_r


def with_score_function(value: Tensor, policy_token_logps: Tensor) -> Tensor:
    """value + sg(value)·(lp − sg(lp)): same value; gradient ∇value + value·∇lp, whose expectation
    over y_t ~ πθ is ∇ E_{y_t~πθ}[value] (the score-function / REINFORCE identity)."""
    lp = policy_token_logps
    return value + value.detach() * (lp - lp.detach())


def importance_ratio(policy_token_logps: Tensor, old_token_logps: Tensor, clip: float) -> Tensor:
    """ρ_t = πθ(y_t)/π_old(y_t), detached, capped at `clip`: (…), (…) -> (…)."""
    return (policy_token_logps.detach() - old_token_logps.to(policy_token_logps.dtype)).exp().clamp(max=clip)


def token_kl(estimator: str, *, policy_support_logps: Tensor, ref_support_logps: Tensor,
             policy_token_logps: Tensor, ref_token_logps: Tensor, gradient: str = "score_function",
             ratio: Tensor | None = None) -> Tensor:
    """The per-token KL_t estimate (S,T') by `estimator`, with the gradient `gradient` asks for.

    policy_/ref_support_logps (S,T',K): both sides' log-probs at the same support ids (slots that do
    not count hold `EMPTY_BIN` on both sides); policy_/ref_token_logps (S,T'): at the sampled token.
    `ratio` (S,T'): k1/k3 on a stale round, the detached importance ratio (`importance_ratio`) that
    weights each token's estimate; None on fresh samples (and ignored by topk_tail)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"token_kl: estimator must be one of {', '.join(ESTIMATORS)} (got {estimator!r})")
    if gradient not in GRADIENTS:
        raise ValueError(f"token_kl: gradient must be one of {', '.join(GRADIENTS)} (got {gradient!r})")
    if estimator == "topk_tail":
        return topk_tail_kl(policy_support_logps, ref_support_logps)
    lp = _upcast(policy_token_logps)
    ref = ref_token_logps.to(lp.dtype)
    value = k1(lp, ref) if estimator == "k1" else k3(lp, ref)
    value = with_score_function(value, lp) if gradient == "score_function" else value
    return value if ratio is None else ratio.to(value.dtype) * value
