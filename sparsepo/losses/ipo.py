"""IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (arXiv 2310.12036), Eq. 17, with per-token averaged log-prob ratios."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import check, response_lengths
from sparsepo.losses.knobs import FDivKnob, PairKnobs, f_scores, output_with_knobs, pair_logratios
from sparsepo.losses.types import LossInputs, LossOutput


H_READINGS = ("token_mean", "sequence")


@dataclass(kw_only=True)
class IPOParams(PairKnobs, FDivKnob):
    """β, h, f-DPO's f_divergence_type, and the knobs of `knobs.PairKnobs`: wpo_weighting and sft_weight with either h;
    ld_alpha only with h="sequence". The token mean already takes the length out of each log-ratio,
    and LD-DPO (arXiv 2409.06411) is defined on sequence sums: discounting the excess tokens inside
    a mean that still counts them is a reading no paper gives, so h="token_mean" refuses ld_alpha."""

    beta: float = 0.1
    """β (the paper's τ): regularisation strength; the loss pulls h towards 1/(2β)."""
    h: str = "token_mean"
    """How h is read: "token_mean" (log-ratios averaged per response token, TRL's `ipo`; default) or
    "sequence" (the paper's Eq. 17: summed log-ratios, so 1/(2β) is a per-sequence target)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "IPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.h in H_READINGS, "IPOParams", f"h must be one of {', '.join(H_READINGS)} (got {self.h!r})")
        check(not (self.desensitised and self.h == "token_mean"), "IPOParams",
              f"ld_alpha={self.ld_alpha} needs h=sequence: LD-DPO discounts tokens of sequence sums, and h=token_mean "
              f"averages per token already; set h=sequence (the paper's Eq. 17) or leave ld_alpha null")


def ipo_loss(inputs: LossInputs, params: IPOParams) -> LossOutput:
    """IPO: a squared loss that regresses the log-ratio difference onto 1/(2β).

        h    = (log πθ(yw) − log πref(yw))/|yw| − (log πθ(yl) − log πref(yl))/|yl|
        loss = (h − 1/(2β))²

    Azar et al. 2023 (arXiv 2310.12036), Eq. 17 (the sampled IPO loss, τ = β). The paper's h uses
    sequence log-ratios (`h="sequence"`); by default, like TRL's `ipo`, we average them per token
    (|y| = mask.sum(-1)), which makes 1/(2β) a per-token target independent of response length.
    Default β=0.1. The logged rewards follow the same reading: per-token averaged by default (TRL's
    dashboards show summed ones), summed with `h="sequence"`. With h="sequence", ld_alpha replaces
    the sums by LD-DPO's (`knobs.pair_logratios`); wpo_weighting and sft_weight act on the loss
    (`knobs.output_with_knobs`); f_divergence_type replaces each log-ratio by f-DPO's f'(u) before the
    per-token average (`knobs.f_scores`, TRL's `ipo` with `f_divergence_type`).

    Reads: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,);
    chosen_mask, rejected_mask (B,T) for |y|. Rewards: β·(log πθ(y) − log πref(y))/|y|, (B,).
    """
    a, b = pair_logratios(inputs, params, "ipo")
    mw, ml = inputs.require("ipo", "chosen_mask", "rejected_mask")
    lw, ll = (response_lengths(mw), response_lengths(ml)) if params.h == "token_mean" else (1.0, 1.0)
    sa, sb = f_scores(a, b, params)
    losses = (sa / lw - sb / ll - 1.0 / (2.0 * params.beta)) ** 2
    return output_with_knobs(inputs, params, "ipo", losses, params.beta * a / lw, params.beta * b / ll)
