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
    gamma: float | None = None
    """γ: target reward margin, in reward units (the paper's γ); 0.5 when neither it nor
    gamma_beta_ratio is set."""
    gamma_beta_ratio: float | None = None
    """γ/β, the official code's knob (`gamma_beta_ratio`, e.g. 0.25 with β=2 is γ=0.5); give this or
    gamma, not both."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "SimPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.gamma is None or self.gamma_beta_ratio is None, "SimPOParams",
              f"gamma and gamma_beta_ratio are both set ({self.gamma}, {self.gamma_beta_ratio}); keep one "
              f"(gamma = gamma_beta_ratio·beta) and unset the other (e.g. method.gamma=null)")
        if self.gamma is None and self.gamma_beta_ratio is None:
            self.gamma = 0.5
        if self.gamma is not None:
            check(self.gamma >= 0, "SimPOParams", f"gamma (the target margin) must be >= 0 (got {self.gamma})")
        else:
            check(self.gamma_beta_ratio >= 0, "SimPOParams",
                  f"gamma_beta_ratio must be >= 0 (got {self.gamma_beta_ratio})")

    @property
    def margin(self) -> float:
        """γ in reward units: gamma, or gamma_beta_ratio·beta."""
        return self.gamma if self.gamma is not None else self.gamma_beta_ratio * self.beta


def simpo_loss(inputs: LossInputs, params: SimPOParams) -> LossOutput:
    """SimPO: reference-free, length-normalised rewards with a target margin.

        r(y) = β/|y|·log πθ(y)
        loss = −log σ(r(yw) − r(yl) − γ)

    Meng et al. 2024 (arXiv 2405.14734), Eq. 6. Defaults β=2.0, γ=0.5; γ may instead be given as the
    official code's γ/β (`gamma_beta_ratio`).

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask, rejected_mask (B,T) for |y|.
    Returns losses (B,), rewards r(yw), r(yl) (B,).
    """
    pw, pl, mw, ml = inputs.require("simpo", "policy_chosen_logps", "policy_rejected_logps",
                                    "chosen_mask", "rejected_mask")
    chosen = params.beta * pw / response_lengths(mw)
    rejected = params.beta * pl / response_lengths(ml)
    return make_output(sigmoid_loss(chosen - rejected - params.margin), chosen, rejected)
