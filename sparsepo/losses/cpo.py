"""CPO: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
Performance in Machine Translation" (arXiv 2401.08417), §3 (L_CPO = L_prefer + L_NLL)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import check, chosen_nll, make_output, sigmoid_loss
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class CPOParams:
    beta: float = 0.1
    """β: scale of the reference-free rewards β·log πθ(y) (paper and TRL default 0.1)."""
    alpha: float = 1.0
    """α: weight of the chosen response's per-token NLL (TRL's `cpo_alpha`, default 1; the paper adds it
    unweighted). 0 leaves the preference term alone."""
    label_smoothing: float = 0.0
    """ε of cDPO on the preference term, in [0, 0.5) (TRL's CPO has the same knob)."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "CPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.alpha >= 0, "CPOParams", f"alpha must be >= 0 (got {self.alpha})")
        check(0.0 <= self.label_smoothing < 0.5, "CPOParams",
              f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")


def cpo_loss(inputs: LossInputs, params: CPOParams) -> LossOutput:
    """CPO: DPO's logistic loss with the reference dropped, plus behaviour cloning of the chosen.

        r(y) = β·log πθ(y)   (sequence sum, no reference)
        loss = −log σ(r(yw) − r(yl)) + α·(−log πθ(yw)/|yw|)

    Xu et al. 2024 (arXiv 2401.08417), §3: L_prefer (DPO with a uniform reference) + L_NLL; TRL's
    `CPOTrainer` with loss_type="sigmoid". The NLL is averaged per chosen response (TRL averages over
    all chosen tokens of the batch; equal for equal lengths). Defaults β=0.1, α=1, ε=0.

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask (B,T) for |yw|.
    Returns losses (B,), rewards r(yw), r(yl) (B,); metric "nll".
    """
    pw, pl = inputs.require("cpo", "policy_chosen_logps", "policy_rejected_logps")
    chosen, rejected = params.beta * pw, params.beta * pl
    nll = chosen_nll(inputs)
    losses = sigmoid_loss(chosen - rejected, params.label_smoothing) + params.alpha * nll
    return make_output(losses, chosen, rejected, nll=nll.mean())
