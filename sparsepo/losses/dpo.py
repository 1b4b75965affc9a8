"""DPO: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), Eq. 7."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sparsepo.losses.common import check, chosen_nll, make_output, sigmoid_loss
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class DPOParams:
    beta: float = 0.1
    """β: inverse strength of the implicit KL constraint to the reference (paper default 0.1)."""
    label_smoothing: float = 0.0
    """ε of conservative DPO (cDPO): the probability that a preference label is flipped; 0 is plain DPO."""
    sft_weight: float = 0.0
    """α of RPO: weight of the chosen response's per-token NLL, −log πθ(yw)/|yw|, added to each pair's
    loss (RPO, Pang et al. 2024: 1; TRL's `rpo_alpha`). 0 is plain DPO."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "DPOParams", f"beta must be > 0 (got {self.beta})")
        check(0.0 <= self.label_smoothing < 0.5, "DPOParams",
              f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing}); 0 is plain DPO")
        check(self.sft_weight >= 0, "DPOParams", f"sft_weight must be >= 0 (got {self.sft_weight}); 0 is plain DPO")


def dpo_rewards(inputs: LossInputs, beta: float, method: str) -> tuple[Tensor, Tensor]:
    """β·(log πθ(y) − log πref(y)) for chosen and rejected, each (B,): DPO's implicit rewards."""
    pw, pl, rw, rl = inputs.require(method, "policy_chosen_logps", "policy_rejected_logps",
                                    "ref_chosen_logps", "ref_rejected_logps")
    return beta * (pw - rw), beta * (pl - rl)


def dpo_loss(inputs: LossInputs, params: DPOParams) -> LossOutput:
    """DPO, with cDPO label smoothing and RPO's NLL term.

        r(y) = β·(log πθ(y) − log πref(y))
        loss = −(1−ε)·log σ(r(yw) − r(yl)) − ε·log σ(r(yl) − r(yw)) + α·(−log πθ(yw)/|yw|)

    Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7; ε from Mitchell 2023, "A note on DPO with noisy
    preferences" (cDPO); α (sft_weight) from Pang et al. 2024, "Iterative Reasoning Preference
    Optimization" (arXiv 2404.19733), the DPO+NLL loss (RPO; the paper weights DPO by α with α=1,
    TRL's `rpo_alpha` weights the NLL, as here), the NLL averaged over each chosen response's
    tokens. TRL averages over all chosen tokens of the batch instead, which weights long
    responses more; the two agree when the responses have equal length. Defaults β=0.1, ε=0, α=0.

    Reads: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, all (B,)
    sequence log-probs (Σ over response tokens); chosen_mask (B,T) for |yw| when α > 0.
    Returns losses (B,), rewards r(yw), r(yl) (B,); metric "nll" when α > 0.
    """
    chosen, rejected = dpo_rewards(inputs, params.beta, "dpo")
    losses = sigmoid_loss(chosen - rejected, params.label_smoothing)
    if not params.sft_weight:
        return make_output(losses, chosen, rejected)
    nll = chosen_nll(inputs)
    return make_output(losses + params.sft_weight * nll, chosen, rejected, nll=nll.mean())
