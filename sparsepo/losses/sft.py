"""SFT on the chosen response: the NLL term that RPO, CPO and ORPO add, as a row of its own so that
it can be combined (`method.name: [dpo, sft]`, TRL's `sft` loss type)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import chosen_nll, make_output, response_lengths
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class SFTParams:
    """No hyper-parameters: weight it with `method.weights` in a combination."""


def sft_loss(inputs: LossInputs, params: SFTParams) -> LossOutput:
    """loss = −log πθ(yw)/|yw|, the per-token NLL of the chosen response; the rejected one is unused.

    Maximum likelihood on the preferred responses (Ouyang et al. 2022, arXiv 2203.02155, §3.5 SFT; the
    NLL term of RPO, Pang et al. 2024, arXiv 2404.19733). Averaged per response; TRL's `sft` takes one
    cross-entropy over all chosen tokens of the batch (equal for equal lengths).

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask, rejected_mask (B,T).
    Rewards: the per-token average log-probs log πθ(y)/|y| (B,), for margin and accuracy only.
    """
    pw, pl, mw, ml = inputs.require("sft", "policy_chosen_logps", "policy_rejected_logps",
                                    "chosen_mask", "rejected_mask")
    return make_output(chosen_nll(inputs), pw / response_lengths(mw), pl / response_lengths(ml))
