"""SFT on the chosen response: the NLL term that RPO, CPO and ORPO add, as a row of its own so that
it can be combined (`method.name: [dpo, sft]`, TRL's `sft` loss type)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import chosen_nll, response_lengths
from sparsepo.losses.knobs import WPOKnob, output_with_knobs
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class SFTParams(WPOKnob):
    """WPO's wpo_weighting / wpo_clip only: weight the row with `method.weights` in a combination. In
    [dpo, sft] with wpo_weighting the pair weight multiplies the NLL too, as TRL 1.16 weighs every
    loss type of its list (`knobs.output_with_knobs`)."""


def sft_loss(inputs: LossInputs, params: SFTParams) -> LossOutput:
    """loss = −log πθ(yw)/|yw|, the per-token NLL of the chosen response; the rejected one is unused.

    Maximum likelihood on the preferred responses (Ouyang et al. 2022, arXiv 2203.02155, §3.5 SFT; the
    NLL term of RPO, Pang et al. 2024, arXiv 2404.19733). Averaged per response; TRL's `sft` takes one
    cross-entropy over all chosen tokens of the batch (equal for equal lengths).

    With wpo_weighting the loss is w·NLL, w WPO's detached pair weight (TRL 1.16 weighs its `sft` term so;
    its term is the batch's token-mean NLL times each pair's w, ours each pair's own NLL times its w: the
    two agree when the chosen responses' NLLs and lengths do).

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask, rejected_mask (B,T); with
    wpo_weighting also `knobs.WPO_FIELDS`.
    Rewards: the per-token average log-probs log πθ(y)/|y| (B,), for margin and accuracy only.
    """
    pw, pl, mw, ml = inputs.require("sft", "policy_chosen_logps", "policy_rejected_logps",
                                    "chosen_mask", "rejected_mask")
    return output_with_knobs(inputs, params, "sft", chosen_nll(inputs), pw / response_lengths(mw),
                             pl / response_lengths(ml))
