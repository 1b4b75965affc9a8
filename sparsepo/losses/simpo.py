"""SimPO: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward" (arXiv 2405.14734), Eq. 6."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import check, make_output, response_lengths, sigmoid_loss
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class SimPOParams:
    beta: float = 2.0
    """β: scale of the length-normalised reward β/|y|·log πθ(y) (paper range 2.0–2.5)."""
    gamma: float = 0.5
    """γ: target reward margin, in reward units (absolute, not the code's γ/β ratio)."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "SimPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.gamma >= 0, "SimPOParams", f"gamma (the target margin) must be >= 0 (got {self.gamma})")


def simpo_loss(inputs: LossInputs, params: SimPOParams) -> LossOutput:
    """SimPO: reference-free, length-normalised rewards with a target margin.

        r(y) = β/|y|·log πθ(y)
        loss = −log σ(r(yw) − r(yl) − γ)

    Meng et al. 2024 (arXiv 2405.14734), Eq. 6. Defaults β=2.0, γ=0.5.

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask, rejected_mask (B,T) for |y|.
    Returns losses (B,), rewards r(yw), r(yl) (B,).
    """
    pw, pl, mw, ml = inputs.require("simpo", "policy_chosen_logps", "policy_rejected_logps",
                                    "chosen_mask", "rejected_mask")
    chosen = params.beta * pw / response_lengths(mw)
    rejected = params.beta * pl / response_lengths(ml)
    return make_output(sigmoid_loss(chosen - rejected - params.gamma), chosen, rejected)
