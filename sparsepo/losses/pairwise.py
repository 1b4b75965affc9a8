"""DPO-family losses that change only the function applied to the pair's log-ratios.

Every loss here reads the four sequence log-probs (B,) (and, for sigmoid_norm, the masks (B,T) for
|y|), forms the log-ratios a = log πθ(yw) − log πref(yw), b = log πθ(yl) − log πref(yl), Δ = a − b,
and returns per-pair losses (B,) with rewards β·a, β·b (TRL's convention for every DPO loss type).
Formulas match TRL's `DPOTrainer` loss types of the same name (trl/trainer/dpo_trainer.py).

The knobs of `knobs.py` act on every row here through `knobs.pair_logratios` (LD-DPO's `ld_alpha`:
a and b are then the desensitised log-ratios, rewards included), `knobs.f_scores` (f-DPO's
`f_divergence_type`: Δ becomes f'(u_w) − f'(u_l), on the rows whose loss reads only Δ, all here but
nca_pair and sppo_hard, as in TRL; rewards stay β·a, β·b) and `knobs.output_with_knobs` (WPO's `wpo_weighting`, RPO's `sft_weight`): each row's params
inherit `PairKnobs`, except sigmoid_norm, which averages per token and so takes no `ld_alpha` (see
its params).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsepo.losses.common import check, response_lengths
from sparsepo.losses.knobs import FDivKnob, PairKnobs, SFTKnob, WPOKnob, f_scores, output_with_knobs, pair_logratios
from sparsepo.losses.types import LossInputs, LossOutput


def _beta(owner: str, beta: float) -> None:
    check(beta > 0, owner, f"beta must be > 0 (got {beta})")


@dataclass(kw_only=True)
class HingeParams(PairKnobs, FDivKnob):
    beta: float = 0.1
    """β: the hinge is relu(1 − β·Δ), so 1/β is the log-ratio margin (SLiC's δ); TRL default 0.1."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _beta("HingeParams", self.beta)


def hinge_loss(inputs: LossInputs, params: HingeParams) -> LossOutput:
    """SLiC hinge on the reference-normalised margin: loss = relu(1 − β·Δ).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (arXiv
    2305.10425), the rank-calibration loss max(0, δ − log Pθ(yw) + log Pθ(yl)) (§2), here on
    log-ratios to the reference as in Liu et al. 2023 (RSO, arXiv 2309.06657) and TRL's `hinge`.
    Zero gradient once β·Δ ≥ 1. Default β=0.1.
    """
    a, b = pair_logratios(inputs, params, "hinge")
    sa, sb = f_scores(a, b, params)
    return output_with_knobs(inputs, params, "hinge", torch.relu(1.0 - params.beta * (sa - sb)), params.beta * a,
                             params.beta * b)


@dataclass(kw_only=True)
class RobustParams(PairKnobs, FDivKnob):
    beta: float = 0.1
    """β of DPO."""
    label_smoothing: float = 0.1
    """ε: the assumed probability that a preference label is flipped, in [0, 0.5); 0.1 as in the rDPO paper's
    experiments and TRL's docs. ε=0 is plain DPO."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _beta("RobustParams", self.beta)
        check(0.0 <= self.label_smoothing < 0.5, "RobustParams",
              f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing}); 0 is plain DPO")


def robust_loss(inputs: LossInputs, params: RobustParams) -> LossOutput:
    """rDPO: an unbiased estimate of the clean-label DPO loss under label-flip noise ε.

        ℓ(z) = −log σ(z);  loss = ((1−ε)·ℓ(β·Δ) − ε·ℓ(−β·Δ)) / (1 − 2ε)

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback" (arXiv 2403.00409), the de-biased loss of §3; TRL `robust`. Unlike cDPO's label
    smoothing the flipped term is subtracted, so the loss can go negative. Defaults β=0.1, ε=0.1.
    """
    a, b = pair_logratios(inputs, params, "robust")
    sa, sb = f_scores(a, b, params)
    z, eps = params.beta * (sa - sb), params.label_smoothing
    losses = ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return output_with_knobs(inputs, params, "robust", losses, params.beta * a, params.beta * b)


@dataclass(kw_only=True)
class ExoParams(PairKnobs, FDivKnob):
    beta: float = 0.1
    """β_π: scale of the policy's log-ratio inside the softmax over {yw, yl}."""
    label_smoothing: float = 1e-3
    """ε: the target distribution over {yw, yl} is (1−ε, ε); must be in (0, 0.5) since log ε appears.
    1e-3 as recommended by the paper (TRL 1.16 has no fallback: its exo_pair refuses label_smoothing=0
    and names 1e-3)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _beta("ExoParams", self.beta)
        check(0.0 < self.label_smoothing < 0.5, "ExoParams",
              f"label_smoothing must be in (0, 0.5) (got {self.label_smoothing}): EXO takes log ε")


def exo_pair_loss(inputs: LossInputs, params: ExoParams) -> LossOutput:
    """EXO-pref (K=2): the reverse KL from the policy's pair distribution to the smoothed label.

        q = σ(β·Δ);  loss = KL((q, 1−q) ‖ (1−ε, ε))
                          = q·(log q − log(1−ε)) + (1−q)·(log(1−q) − log ε)

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment" (arXiv
    2402.00856), Eq. 16; TRL `exo_pair`. Minimum 0 at q = 1−ε. Defaults β=0.1, ε=1e-3.
    """
    a, b = pair_logratios(inputs, params, "exo_pair")
    sa, sb = f_scores(a, b, params)
    z, eps = params.beta * (sa - sb), params.label_smoothing
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return output_with_knobs(inputs, params, "exo_pair", losses, params.beta * a, params.beta * b)


@dataclass(kw_only=True)
class NCAParams(PairKnobs):
    beta: float = 0.1
    """β: scale of the rewards r = β·(log πθ − log πref); TRL default 0.1."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _beta("NCAParams", self.beta)


def nca_pair_loss(inputs: LossInputs, params: NCAParams) -> LossOutput:
    """Pairwise NCA: each reward is classified against an absolute scale, not only against the other.

        loss = −log σ(r(yw)) − ½·log σ(−r(yw)) − ½·log σ(−r(yl)),  r = β·(log πθ − log πref)

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards" (arXiv
    2402.05369), the NCA loss for K=2 responses (§3); TRL `nca_pair`. The chosen term is minimised at
    r(yw) = log 2 (σ = 2/3), so NCA raises the chosen likelihood only up to that point. Default β=0.1.
    """
    a, b = pair_logratios(inputs, params, "nca_pair")
    rw, rl = params.beta * a, params.beta * b
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return output_with_knobs(inputs, params, "nca_pair", losses, rw, rl)


@dataclass(kw_only=True)
class SPPOParams(PairKnobs):
    beta: float = 0.1
    """β (the paper's 1/η): log-ratios are regressed onto ±1/(2β); TRL default 0.1 (targets ±5)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _beta("SPPOParams", self.beta)


def sppo_hard_loss(inputs: LossInputs, params: SPPOParams) -> LossOutput:
    """SPPO with hard win probabilities (P(yw ≻ yl) = 1, P(yl ≻ yw) = 0):

        loss = (a − 1/(2β))² + (b + 1/(2β))²

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment" (arXiv
    2405.00675), Eq. 4.7 / Algorithm 1 with P̂ set to 1 for the winner and 0 for the loser (the
    paper estimates soft P̂ with PairRM outside the loss); TRL `sppo_hard`. Default β=0.1.
    """
    a, b = pair_logratios(inputs, params, "sppo_hard")
    target = 0.5 / params.beta
    losses = (a - target) ** 2 + (b + target) ** 2
    return output_with_knobs(inputs, params, "sppo_hard", losses, params.beta * a, params.beta * b)


@dataclass(kw_only=True)
class DiscoPOPParams(PairKnobs, FDivKnob):
    beta: float = 0.1
    """β of DPO (TRL default 0.1)."""
    tau: float = 0.05
    """τ: temperature of the sigmoid that mixes the logistic and exponential losses (paper: 0.05)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _beta("DiscoPOPParams", self.beta)
        check(self.tau > 0, "DiscoPOPParams", f"tau must be > 0 (got {self.tau})")


def discopop_loss(inputs: LossInputs, params: DiscoPOPParams) -> LossOutput:
    """DiscoPOP / LRML (log-ratio modulated loss): a blend of DPO's logistic and an exponential loss.

        z = β·Δ;  m = σ(z/τ);  loss = (1 − m)·(−log σ(z)) + m·e^{−z}

    Lu, Holt, Fanconi, Chan et al. 2024, "Discovering Preference Optimization Algorithms with and for
    Large Language Models" (arXiv 2406.08414), Eq. 5; TRL `discopop`. Not convex in z: see the
    tests for where its slope turns positive. Defaults β=0.1, τ=0.05.
    """
    a, b = pair_logratios(inputs, params, "discopop")
    sa, sb = f_scores(a, b, params)
    z = params.beta * (sa - sb)
    mix = torch.sigmoid(z / params.tau)
    losses = (1.0 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)
    return output_with_knobs(inputs, params, "discopop", losses, params.beta * a, params.beta * b)


@dataclass(kw_only=True)
class SigmoidNormParams(WPOKnob, SFTKnob, FDivKnob):
    """β, wpo_weighting and sft_weight. No ld_alpha: the per-token average already takes the length
    out of each log-ratio, and LD-DPO (arXiv 2409.06411) is defined on sequence sums; discounting the
    excess tokens inside a mean that still counts them is a third reading no paper gives (the key is
    refused as unknown). No label_smoothing either: TRL's sigmoid_norm has none."""

    beta: float = 0.1
    """β on the per-token average log-ratio (TRL default 0.1; per-token ratios are |y| times smaller
    than DPO's, so a larger β gives a comparable scale)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _beta("SigmoidNormParams", self.beta)


def sigmoid_norm_loss(inputs: LossInputs, params: SigmoidNormParams) -> LossOutput:
    """Length-normalised DPO: DPO's logistic loss on per-token average log-ratios.

        ā = a/|yw|,  b̄ = b/|yl|;  loss = −log σ(β·(ā − b̄))

    DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) with the length normalisation of IPO's
    practice (Azar et al. 2023, Eq. 17 as TRL implements it) and SimPO (arXiv 2405.14734, Eq. 4);
    TRL `sigmoid_norm`. With |yw| = |yl| = n it is DPO at β/n. Default β=0.1. Rewards β·ā, β·b̄.
    """
    a, b = pair_logratios(inputs, params, "sigmoid_norm")
    mw, ml = inputs.require("sigmoid_norm", "chosen_mask", "rejected_mask")
    lw, ll = response_lengths(mw), response_lengths(ml)
    sa, sb = f_scores(a, b, params)
    losses = -F.logsigmoid(params.beta * (sa / lw - sb / ll))
    return output_with_knobs(inputs, params, "sigmoid_norm", losses, params.beta * a / lw, params.beta * b / ll)
