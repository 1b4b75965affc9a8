"""CPO and its TRL variants: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the
Boundaries of LLM Performance in Machine Translation" (arXiv 2401.08417), §3 (L_CPO = L_prefer + L_NLL),
with the loss types of TRL 1.16's `CPOTrainer` (trl/experimental/cpo): sigmoid (`cpo`), hinge
(`cpo_hinge`), ipo (`cpo_ipo`) and AlphaPO (`alphapo`, TRL's `loss_type="alphapo"`).

Every row here is reference-free: the rewards are functions of the policy's log-probs alone. Each
adds `cpo_alpha`·NLL of the chosen response (TRL's `cpo_alpha`, the behaviour-cloning term; averaged
per chosen response here, over all chosen tokens of the batch in TRL: equal for equal lengths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsepo.losses.common import check, chosen_nll, make_output, response_lengths, sigmoid_loss
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class CPOMarginParams:
    """β and cpo_alpha: the params of TRL's CPO hinge and ipo loss types (no label smoothing: TRL
    ignores it for those two, so the key is refused here as unknown)."""

    beta: float = 0.1
    """β: scale of the reward difference (TRL's CPO default 0.1); for ipo the loss pulls the
    per-token average difference towards 1/(2β), for hinge the margin is 1/β."""
    cpo_alpha: float = 1.0
    """Weight of the chosen response's per-token NLL (TRL's `cpo_alpha`, default 1; the paper adds
    it unweighted). 0 leaves the preference term alone."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check(self.beta > 0, owner, f"beta must be > 0 (got {self.beta})")
        check(self.cpo_alpha >= 0, owner, f"cpo_alpha must be >= 0 (got {self.cpo_alpha})")


@dataclass(kw_only=True)
class CPOParams(CPOMarginParams):
    label_smoothing: float = 0.0
    """ε of cDPO on the preference term, in [0, 0.5) (TRL's CPO has the same knob)."""

    renamed_keys = {"alpha": "cpo_alpha"}
    """Keys an older sparsepo wrote under another name (a checkpoint's config is read through this)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.label_smoothing < 0.5, "CPOParams",
              f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")


def _with_nll(inputs: LossInputs, cpo_alpha: float, losses: Tensor, chosen: Tensor, rejected: Tensor) -> LossOutput:
    """losses + cpo_alpha·NLL(yw), metric "nll" when cpo_alpha > 0."""
    if not cpo_alpha:
        return make_output(losses, chosen, rejected)
    nll = chosen_nll(inputs)
    return make_output(losses + cpo_alpha * nll, chosen, rejected, nll=nll.mean())


def cpo_loss(inputs: LossInputs, params: CPOParams) -> LossOutput:
    """CPO: DPO's logistic loss with the reference dropped, plus behaviour cloning of the chosen.

        r(y) = β·log πθ(y)   (sequence sum, no reference)
        loss = −(1−ε)·log σ(r(yw) − r(yl)) − ε·log σ(r(yl) − r(yw)) + cpo_alpha·(−log πθ(yw)/|yw|)

    Xu et al. 2024 (arXiv 2401.08417), §3, Eq. 3 (L_prefer, DPO with a uniform reference) + L_NLL;
    TRL's `CPOTrainer` with loss_type="sigmoid". Defaults β=0.1, cpo_alpha=1, ε=0.

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask (B,T) for |yw|.
    Returns losses (B,), rewards r(yw), r(yl) (B,); metric "nll" when cpo_alpha > 0.
    """
    pw, pl = inputs.require("cpo", "policy_chosen_logps", "policy_rejected_logps")
    chosen, rejected = params.beta * pw, params.beta * pl
    return _with_nll(inputs, params.cpo_alpha, sigmoid_loss(chosen - rejected, params.label_smoothing),
                     chosen, rejected)


def cpo_hinge_loss(inputs: LossInputs, params: CPOMarginParams) -> LossOutput:
    """CPO with SLiC's hinge: loss = relu(1 − β·(log πθ(yw) − log πθ(yl))) + cpo_alpha·NLL(yw).

    Xu et al. 2024 (arXiv 2401.08417), §3 with L_prefer replaced by the calibration hinge of SLiC-HF
    (Zhao et al. 2023, arXiv 2305.10425, §2); TRL's `CPOTrainer` loss_type="hinge" (sequence sums,
    as its sigmoid). Zero preference gradient once β·Δ ≥ 1. Defaults β=0.1, cpo_alpha=1.

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask (B,T) for the NLL.
    Rewards β·log πθ(y) (B,); metric "nll" when cpo_alpha > 0.
    """
    pw, pl = inputs.require("cpo_hinge", "policy_chosen_logps", "policy_rejected_logps")
    chosen, rejected = params.beta * pw, params.beta * pl
    return _with_nll(inputs, params.cpo_alpha, torch.relu(1.0 - (chosen - rejected)), chosen, rejected)


def cpo_ipo_loss(inputs: LossInputs, params: CPOMarginParams) -> LossOutput:
    """CPO with IPO's squared loss on per-token average log-probs:

        h = log πθ(yw)/|yw| − log πθ(yl)/|yl|;  loss = (h − 1/(2β))² + cpo_alpha·NLL(yw)

    Xu et al. 2024 (arXiv 2401.08417), §3 with L_prefer replaced by IPO's Eq. 17 (Azar et al. 2023,
    arXiv 2310.12036) against a uniform reference; TRL's `CPOTrainer` loss_type="ipo", which
    averages the log-probs per response token for ipo (`average_log_prob`). Defaults β=0.1, cpo_alpha=1.

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask, rejected_mask (B,T) for |y|.
    Rewards β·log πθ(y)/|y| (B,), as TRL logs them; metric "nll" when cpo_alpha > 0.
    """
    pw, pl, mw, ml = inputs.require("cpo_ipo", "policy_chosen_logps", "policy_rejected_logps",
                                    "chosen_mask", "rejected_mask")
    aw, al = pw / response_lengths(mw), pl / response_lengths(ml)
    losses = (aw - al - 1.0 / (2.0 * params.beta)) ** 2
    return _with_nll(inputs, params.cpo_alpha, losses, params.beta * aw, params.beta * al)


@dataclass(kw_only=True)
class AlphaPOParams:
    beta: float = 0.1
    """β: scale of the AlphaPO rewards (TRL's CPO default 0.1)."""
    gamma: float = 0.5
    """γ: target reward margin in reward units, as SimPO's γ (TRL's `simpo_gamma`, default 0.5;
    TRL subtracts γ/β inside β·(…), the same thing)."""
    alpha: float = 0.25
    """α: the reward's shape, r = (1 − p̄^{−α})/α. α → 0 is SimPO's log p̄ (TRL's default 0, with
    which TRL's "alphapo" is CPO-SimPO); 0.25 here so that the row is AlphaPO and not SimPO: tune it
    per model, as the paper does (it sweeps α of both signs)."""
    cpo_alpha: float = 0.0
    """Weight of the chosen response's NLL (TRL's `loss_type="alphapo"` sets cpo_alpha=0)."""
    label_smoothing: float = 0.0
    """ε of cDPO on the logistic term, in [0, 0.5) (TRL's CPO knob)."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "AlphaPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.gamma >= 0, "AlphaPOParams", f"gamma (the target margin) must be >= 0 (got {self.gamma})")
        check(math.isfinite(self.alpha), "AlphaPOParams", f"alpha must be a finite number (got {self.alpha})")
        check(self.cpo_alpha >= 0, "AlphaPOParams", f"cpo_alpha must be >= 0 (got {self.cpo_alpha})")
        check(0.0 <= self.label_smoothing < 0.5, "AlphaPOParams",
              f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")


def alphapo_reward(avg_logps: Tensor, alpha: float) -> Tensor:
    """r_α = (1 − p̄^{−α})/α with log p̄ = avg_logps, computed as −expm1(−α·log p̄)/α (exact near α·log p̄ = 0);
    α = 0 is its limit, log p̄."""
    return avg_logps if alpha == 0.0 else -torch.expm1(-alpha * avg_logps) / alpha


def alphapo_loss(inputs: LossInputs, params: AlphaPOParams) -> LossOutput:
    """AlphaPO: SimPO with the log-likelihood reward replaced by the α-family of reward shapes.

        p̄(y) = πθ(y)^{1/|y|};  r(y) = β·(1 − p̄(y)^{−α})/α
        loss = −(1−ε)·log σ(r(yw) − r(yl) − γ) − ε·log σ(−(r(yw) − r(yl) − γ)) + cpo_alpha·NLL(yw)

    Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment" (arXiv 2501.03884), the
    AlphaPO reward and loss (§3); α → 0 recovers SimPO (arXiv 2405.14734, Eq. 6). TRL 1.16's
    `CPOTrainer` with loss_type="alphapo" (= "simpo" with its `alpha`, cpo_alpha=0): per-token average
    log-probs, logits r̃(yw) − r̃(yl) − γ/β inside σ(β·…). Defaults β=0.1, γ=0.5, α=0.25, cpo_alpha=0.

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask, rejected_mask (B,T) for |y|.
    Returns losses (B,), rewards r(yw), r(yl) (B,) (TRL's β·r̃); metric "nll" when cpo_alpha > 0.
    """
    pw, pl, mw, ml = inputs.require("alphapo", "policy_chosen_logps", "policy_rejected_logps",
                                    "chosen_mask", "rejected_mask")
    chosen = params.beta * alphapo_reward(pw / response_lengths(mw), params.alpha)
    rejected = params.beta * alphapo_reward(pl / response_lengths(ml), params.alpha)
    losses = sigmoid_loss(chosen - rejected - params.gamma, params.label_smoothing)
    return _with_nll(inputs, params.cpo_alpha, losses, chosen, rejected)
