"""TDPO: Zeng et al. 2024, "Token-level Direct Preference Optimization" (ICML 2024, arXiv 2404.11999),
§4.3: the TDPO1 and TDPO2 objectives, with the per-token KL taken on sparse reference distributions."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sparsepo.losses.common import check, make_output, masked_sum, sigmoid_loss, sparse_kl
from sparsepo.losses.dpo import dpo_rewards
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class TDPOParams:
    beta: float = 0.1
    """β: as in DPO, scales both the log-ratio margin and the sequential KL terms."""
    alpha: float = 0.5
    """α: weight of the KL-difference term in TDPO2 (paper default 0.5); TDPO1 ignores it."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "TDPOParams", f"beta must be > 0 (got {self.beta})")
        check(self.alpha >= 0, "TDPOParams", f"alpha must be >= 0 (got {self.alpha}); 0 makes TDPO2 plain DPO")


def sequential_kl(inputs: LossInputs, method: str) -> tuple[Tensor, Tensor]:
    """D(y) = Σ_t mask_t·KL(πref(·|y<t) ‖ πθ(·|y<t)) for chosen and rejected, each (B,), on the sparse
    top-K + tail distributions (`sparse_kl`: a lower bound of the full-vocabulary KL)."""
    ref_w, pol_w, ref_l, pol_l, mw, ml = inputs.require(
        method, "ref_chosen_topk_logps", "policy_chosen_topk_logps",
        "ref_rejected_topk_logps", "policy_rejected_topk_logps", "chosen_mask", "rejected_mask")
    return masked_sum(sparse_kl(ref_w, pol_w), mw), masked_sum(sparse_kl(ref_l, pol_l), ml)


def _tdpo(inputs: LossInputs, beta: float, alpha: float, detach_chosen_kl: bool, method: str) -> LossOutput:
    chosen, rejected = dpo_rewards(inputs, beta, method)
    kl_w, kl_l = sequential_kl(inputs, method)
    chosen_kl = beta * kl_w
    if detach_chosen_kl:
        chosen_kl = chosen_kl.detach()
    logits = (chosen - rejected) - alpha * (beta * kl_l - chosen_kl)
    # rewards as the authors' code reports them: β·(log-ratio + D(y))
    return make_output(sigmoid_loss(logits), chosen + beta * kl_w, rejected + beta * kl_l,
                       kl_chosen=kl_w.mean(), kl_rejected=kl_l.mean())


def tdpo1_loss(inputs: LossInputs, params: TDPOParams) -> LossOutput:
    """TDPO1: DPO's margin minus the difference of sequential forward KLs, gradient through both.

        u    = β·(log πθ(yw) − log πref(yw)) − β·(log πθ(yl) − log πref(yl))
        D(y) = Σ_t mask_t·KL(πref(·|x,y<t) ‖ πθ(·|x,y<t))       (sparse: top-K + tail bins)
        loss = −log σ(u − (β·D(yl) − β·D(yw)))

    Zeng et al. 2024 (arXiv 2404.11999), §4.3, L_TDPO1. Default β=0.1 (α unused).

    Reads: policy/ref chosen/rejected sequence log-probs (B,); chosen_mask, rejected_mask (B,T);
    ref_{chosen,rejected}_topk_logps (B,T,K) and policy_{chosen,rejected}_topk_logps (B,T,K), the
    policy's log-probs at the reference's top-K ids. Rewards: β·(log πθ(y) − log πref(y) + D(y)),
    as in the authors' code. Metrics: kl_chosen, kl_rejected (mean D).
    """
    return _tdpo(inputs, params.beta, 1.0, False, "tdpo1")


def tdpo2_loss(inputs: LossInputs, params: TDPOParams) -> LossOutput:
    """TDPO2: as TDPO1, but the chosen KL is a stop-gradient and the KL difference is weighted by α.

        loss = −log σ(u − α·(β·D(yl) − sg(β·D(yw))))

    Zeng et al. 2024 (arXiv 2404.11999), §4.3, L_TDPO2 (δ₂ with the stop-gradient). Defaults β=0.1,
    α=0.5; α=0 is exactly DPO. Inputs, shapes, rewards and metrics as `tdpo1_loss`.
    """
    return _tdpo(inputs, params.beta, params.alpha, True, "tdpo2")
