"""DPO: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), Eq. 7."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sparsepo.losses.common import check, sigmoid_loss
from sparsepo.losses.knobs import CDPOKnob, FDivKnob, PairKnobs, f_scores, output_with_knobs, pair_logratios
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class DPOParams(PairKnobs, CDPOKnob, FDivKnob):
    """β, and the knobs (`knobs.py`): label_smoothing (cDPO), sft_weight (RPO), ld_alpha (LD-DPO),
    wpo_weighting / wpo_clip (WPO), f_divergence_type / f_alpha_divergence_coef (f-DPO); each is plain
    DPO at its default."""

    beta: float = 0.1
    """β: inverse strength of the implicit KL constraint to the reference (paper default 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "DPOParams", f"beta must be > 0 (got {self.beta})")


def dpo_rewards(inputs: LossInputs, beta: float, method: str) -> tuple[Tensor, Tensor]:
    """β·(log πθ(y) − log πref(y)) for chosen and rejected, each (B,): DPO's implicit rewards."""
    pw, pl, rw, rl = inputs.require(method, "policy_chosen_logps", "policy_rejected_logps",
                                    "ref_chosen_logps", "ref_rejected_logps")
    return beta * (pw - rw), beta * (pl - rl)


def dpo_loss(inputs: LossInputs, params: DPOParams) -> LossOutput:
    """DPO, with cDPO label smoothing, RPO's NLL term, LD-DPO's length desensitisation, WPO's weights
    and f-DPO's divergences.

        r(y) = β·(log π̂θ(y) − log π̂ref(y));  z = β·(f'(u_w) − f'(u_l)), u = π̂θ/π̂ref (z = r(yw) − r(yl) for reverse KL)
        loss = w·[−(1−ε)·log σ(z) − ε·log σ(−z) + α·(−log πθ(yw)/|yw|)]

    log π̂ is the plain sequence log-prob, or LD-DPO's Σ_{t≤l_p} + ld_alpha·Σ_{t>l_p} of the token
    log-probs when ld_alpha is set (`knobs.ld_sequence_logps`; the rewards are then the desensitised
    ones); w is 1, or WPO's detached pair weight when wpo_weighting (`knobs.wpo_weights`; it
    weighs the preference term only, not the NLL). The knobs are applied by `knobs.pair_logratios`
    and `knobs.output_with_knobs`, as in every row that takes them.

    Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7; ε from Mitchell 2023, "A note on DPO with noisy
    preferences" (cDPO); α (sft_weight) from Pang et al. 2024, "Iterative Reasoning Preference
    Optimization" (arXiv 2404.19733), the DPO+NLL loss (RPO, α=1 in the paper; TRL 1.16 writes it
    `loss_type=[sigmoid, sft]`, `loss_weights=[1, α]`), the NLL averaged over each chosen response's
    tokens. TRL's `sft` averages over all chosen tokens of the batch instead, which weights long
    responses more; the two agree when the responses have equal length. f-DPO: Wang et al. 2023
    (arXiv 2309.16240), TRL's `f_divergence_type`. Defaults β=0.1, ε=0, α=0, reverse KL.

    Reads: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, all (B,)
    sequence log-probs (Σ over response tokens); chosen_mask (B,T) for |yw| when α > 0. With
    ld_alpha: policy_/ref_{chosen,rejected}_token_logps (B,T) and both masks as well. With wpo_weighting: policy_{chosen,rejected}_token_logps and _log_sq_mass (B,T).
    Returns losses (B,), rewards r(yw), r(yl) (B,); metrics "nll" when α > 0, "wpo_weight" (the
    batch mean of w) with wpo_weighting.
    """
    a, b = pair_logratios(inputs, params, "dpo")
    sa, sb = f_scores(a, b, params)
    losses = sigmoid_loss(params.beta * (sa - sb), params.label_smoothing)
    return output_with_knobs(inputs, params, "dpo", losses, params.beta * a, params.beta * b)
