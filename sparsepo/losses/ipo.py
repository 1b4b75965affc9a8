"""IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (arXiv 2310.12036), Eq. 17, with per-token averaged log-prob ratios."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import check, make_output, response_lengths
from sparsepo.losses.types import LossInputs, LossOutput


H_READINGS = ("token_mean", "sequence")


@dataclass(kw_only=True)
class IPOParams:
    beta: float = 0.1
    """β (the paper's τ): regularisation strength; the loss pulls h towards 1/(2β)."""
    h: str = "token_mean"
    """How h is read: "token_mean" (log-ratios averaged per response token, TRL's `ipo`; default) or
    "sequence" (the paper's Eq. 17: summed log-ratios, so 1/(2β) is a per-sequence target)."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "IPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.h in H_READINGS, "IPOParams", f"h must be one of {', '.join(H_READINGS)} (got {self.h!r})")


def ipo_loss(inputs: LossInputs, params: IPOParams) -> LossOutput:
    """IPO: a squared loss that regresses the log-ratio difference onto 1/(2β).

        h    = (log πθ(yw) − log πref(yw))/|yw| − (log πθ(yl) − log πref(yl))/|yl|
        loss = (h − 1/(2β))²

    Azar et al. 2023 (arXiv 2310.12036), Eq. 17 (the sampled IPO loss, τ = β). The paper's h uses
    sequence log-ratios (`h="sequence"`); by default, like TRL's `ipo`, we average them per token
    (|y| = mask.sum(-1)), which makes 1/(2β) a per-token target independent of response length.
    Default β=0.1. The logged rewards follow the same reading: per-token averaged by default (TRL's
    dashboards show summed ones), summed with `h="sequence"`.

    Reads: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,);
    chosen_mask, rejected_mask (B,T) for |y|. Rewards: β·(log πθ(y) − log πref(y))/|y|, (B,).
    """
    pw, pl, rw, rl, mw, ml = inputs.require("ipo", "policy_chosen_logps", "policy_rejected_logps",
                                            "ref_chosen_logps", "ref_rejected_logps",
                                            "chosen_mask", "rejected_mask")
    per_token = params.h == "token_mean"
    chosen_ratio = (pw - rw) / response_lengths(mw) if per_token else pw - rw
    rejected_ratio = (pl - rl) / response_lengths(ml) if per_token else pl - rl
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * params.beta)) ** 2
    return make_output(losses, params.beta * chosen_ratio, params.beta * rejected_ratio)
