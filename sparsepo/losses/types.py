"""What every loss takes (`LossInputs`) and returns (`LossOutput`).

Shapes: B pairs, T padded positions, K reference top-K, F SAE features, k FPO top-k, S policy
samples of T' positions. Alignment: per-token tensors at position t describe token x_t, predicted
from logits[:, t-1]; position 0 holds 0 (ids 0). Masks are float 0/1, 1 on response tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(kw_only=True)
class LossInputs:
    """Everything a preference loss may read; each method's row in `METHODS` says which fields it needs."""

    policy_chosen_logps: Tensor
    """(B,) Σ_t mask·token_logps: the policy's log-prob of the chosen response."""
    policy_rejected_logps: Tensor
    """(B,) the same for the rejected response."""
    chosen_mask: Tensor
    """(B,T) float 0/1 response mask of the chosen sequence (never 1 at t=0); |y| = mask.sum(-1)."""
    rejected_mask: Tensor
    """(B,T) the same for the rejected sequence."""
    policy_chosen_token_logps: Tensor | None = None
    """(B,T) log πθ(x_t | x_<t), aligned as above."""
    policy_rejected_token_logps: Tensor | None = None
    """(B,T)"""
    ref_chosen_logps: Tensor | None = None
    """(B,) reference sequence log-prob of the chosen response."""
    ref_rejected_logps: Tensor | None = None
    """(B,)"""
    ref_chosen_token_logps: Tensor | None = None
    """(B,T) log πref(x_t | x_<t), aligned as above, zero outside the response (LD-DPO's `ld_alpha`)."""
    ref_rejected_token_logps: Tensor | None = None
    """(B,T)"""
    policy_chosen_log_sq_mass: Tensor | None = None
    """(B,T) log Σ_v πθ(v | x_<t)², no gradient, aligned as above: the log-probability that two tokens
    drawn from the policy at t agree (WPO's weight alignment; `wpo_weighting`)."""
    policy_rejected_log_sq_mass: Tensor | None = None
    """(B,T)"""
    ref_chosen_topk_logps: Tensor | None = None
    """(B,T,K) the reference's top-K next-token log-probs at each position (TDPO)."""
    policy_chosen_topk_logps: Tensor | None = None
    """(B,T,K) the policy's log-probs at the same K token ids (gathered by the trainer)."""
    ref_rejected_topk_logps: Tensor | None = None
    """(B,T,K)"""
    policy_rejected_topk_logps: Tensor | None = None
    """(B,T,K)"""
    policy_chosen_features: Tensor | None = None
    """(B,F) the policy's SAE features, average-pooled over the chosen response's tokens (FPO)."""
    policy_rejected_features: Tensor | None = None
    """(B,F)"""
    ref_chosen_feature_ids: Tensor | None = None
    """(B,k) long: ids of the reference's pooled top-k SAE features."""
    ref_chosen_feature_values: Tensor | None = None
    """(B,k) their pooled values; every other feature of the reference counts as 0."""
    ref_rejected_feature_ids: Tensor | None = None
    """(B,k) long"""
    ref_rejected_feature_values: Tensor | None = None
    """(B,k)"""
    chosen_oracle_scores: Tensor | None = None
    """(B,T) SePO token scores r_t = log π_oracle(y_t) − log π_oracle_ref(y_t), aligned like token_logps."""
    rejected_oracle_scores: Tensor | None = None
    """(B,T)"""
    chosen_oracle_selection: Tensor | None = None
    """(B,T) float 0/1: the oracle's key tokens, selected on the reference side (live mode sends only
    this, `sepo.sepo_selection`); stands in for chosen_oracle_scores (`table.SUBSTITUTE_FIELDS`)."""
    rejected_oracle_selection: Tensor | None = None
    """(B,T)"""
    chosen_eos_mask: Tensor | None = None
    """(B,T) float 0/1: 1 where the chosen response's token is eos (its end; none when truncated)."""
    rejected_eos_mask: Tensor | None = None
    """(B,T)"""
    sample_mask: Tensor | None = None
    """(S,T') float 0/1 on the generated tokens of S policy samples (SPO)."""
    ref_sample_topk_logps: Tensor | None = None
    """(S,T',K) the reference's log-probs at the KL's support ids on the samples (the policy's top-K,
    optionally ∪ the reference's; slots that must not count hold `losses.kl.EMPTY_BIN` on both sides)."""
    policy_sample_topk_logps: Tensor | None = None
    """(S,T',K) the policy's log-probs at the same ids."""
    ref_sample_token_logps: Tensor | None = None
    """(S,T') the reference's log-prob of each sampled token (k1/k3)."""
    policy_sample_token_logps: Tensor | None = None
    """(S,T') the policy's log-prob of each sampled token."""
    old_sample_token_logps: Tensor | None = None
    """(S,T') the log-prob of each sampled token under the policy that drew it (π_old), when the round is
    stale (generation.staleness ≥ 1 or every_steps > 1); None: fresh samples. k1/k3 weight by πθ/π_old."""

    def require(self, method: str, *names: str) -> tuple[Tensor, ...]:
        """The named fields, or a ValueError naming the first missing one and the method that needs it."""
        out = []
        for name in names:
            value = getattr(self, name)
            if value is None:
                raise ValueError(
                    f"method '{method}' needs LossInputs.{name}, which is None: the trainer must fill it "
                    f"(see METHODS['{method}'].required_fields)."
                )
            out.append(value)
        return tuple(out)


@dataclass
class LossOutput:
    """Per-pair losses (the trainer takes `.mean()`), detached implicit rewards and detached scalar metrics."""

    losses: Tensor
    """(B,) per-pair loss."""
    chosen_rewards: Tensor
    """(B,) detached implicit reward of the chosen response."""
    rejected_rewards: Tensor
    """(B,) detached."""
    metrics: dict[str, Tensor]
    """Detached scalars: always "margin" and "accuracy", plus the method's own."""
