"""SePO: Yang et al. 2024, "Selective Preference Optimization via Token-Level Reward Function
Estimation" (EMNLP 2025, arXiv 2408.13518), §3: the reference-free objective on key tokens."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sparsepo.losses.common import check, make_output, masked_sum, response_lengths, select_tokens, sigmoid_loss
from sparsepo.losses.types import LossInputs, LossOutput

NORMALISE = ("selected", "response", "none")


@dataclass(kw_only=True)
class SePOParams:
    gamma: float = 2.0
    """γ: scale of the selected-token reward (our default, on the scale of SimPO's β; tune per model)."""
    rho: float = 0.3
    """ρ: fraction of each response's tokens kept, ceil(ρ·|y|) and at least 1 (paper 0.3)."""
    normalise: str = "selected"
    """What the selected tokens' log-prob sum is divided by: "selected" (|S|, the mean; default),
    "response" (|y|) or "none" (plain sum). See `sepo_loss`."""

    def __post_init__(self) -> None:
        check(self.gamma > 0, "SePOParams", f"gamma must be > 0 (got {self.gamma})")
        check(0.0 < self.rho <= 1.0, "SePOParams", f"rho must be in (0, 1] (got {self.rho})")
        check(self.normalise in NORMALISE, "SePOParams",
              f"normalise must be one of {', '.join(NORMALISE)} (got {self.normalise!r})")


def _selected_reward(token_logps: Tensor, selected: Tensor, mask: Tensor, gamma: float, normalise: str) -> Tensor:
    total = masked_sum(token_logps, selected)
    if normalise == "selected":
        return gamma * total / response_lengths(selected)
    if normalise == "response":
        return gamma * total / response_lengths(mask)
    return gamma * total


def sepo_loss(inputs: LossInputs, params: SePOParams) -> LossOutput:
    """SePO: a reference-free contrastive loss on the oracle's key tokens only.

        Sw   = the ceil(ρ·|yw|) chosen tokens with the highest oracle score r_t (at least 1)
        Sl   = the ceil(ρ·|yl|) rejected tokens with the lowest r_t
        r(y) = γ·mean_{t∈S} log πθ(y_t | x, y<t)
        loss = −log σ(r(yw) − r(yl))

    Yang et al. 2024 (arXiv 2408.13518), §3, the SePO objective; r_t = log π_oracle(y_t) −
    log π_oracle_ref(y_t) is the DPO-trained oracle's token reward (their Theorem 1). Defaults γ=2.0,
    ρ=0.3, normalise="selected".

    Reading of γ's normalisation (knob `normalise`): Theorem 1 makes the response reward a sum of
    token rewards, and selection keeps the tokens that carry most of it; the objective then scores a
    response, as SimPO does, by the average log-likelihood — of the tokens it optimises, since
    unselected tokens get neither value nor gradient. Dividing by |S| keeps γ's scale independent of ρ
    and of length (|S| ∝ |y|). "response" divides by |y| instead (≈ ρ× smaller rewards, γ rescaled);
    "none" is the unnormalised sum (length-biased).

    Reads: policy_{chosen,rejected}_token_logps (B,T); chosen_mask, rejected_mask (B,T);
    chosen_oracle_scores, rejected_oracle_scores (B,T), aligned like token_logps. Only the selected
    tokens receive gradient. Rewards r(yw), r(yl) (B,). Metrics: selected_fraction (selected tokens /
    response tokens, both sides).
    """
    tw, tl, mw, ml, sw, sl = inputs.require("sepo", "policy_chosen_token_logps", "policy_rejected_token_logps",
                                            "chosen_mask", "rejected_mask",
                                            "chosen_oracle_scores", "rejected_oracle_scores")
    sel_w = select_tokens(sw, mw, params.rho, largest=True)
    sel_l = select_tokens(sl, ml, params.rho, largest=False)
    chosen = _selected_reward(tw, sel_w, mw, params.gamma, params.normalise)
    rejected = _selected_reward(tl, sel_l, ml, params.gamma, params.normalise)
    response_tokens = (mw != 0).sum() + (ml != 0).sum()
    fraction = (sel_w.sum() + sel_l.sum()) / response_tokens.clamp(min=1)
    return make_output(sigmoid_loss(chosen - rejected), chosen, rejected, selected_fraction=fraction)
