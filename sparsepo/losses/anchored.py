"""DPO-family losses that anchor each response's log-ratio on its own (APO) or against a reward
baseline (BCO), instead of only through the pair's difference.

Each reads the four sequence log-probs (B,); a = log πθ(yw) − log πref(yw), b = the same for yl,
Δ = a − b. Rewards are β·a, β·b (TRL's convention). Formulas match TRL's `DPOTrainer` loss types.
The knobs of `knobs.py` act through `knobs.sequence_logps` / `pair_logratios` and
`knobs.output_with_knobs`; APO and BCO take all three of `PairKnobs`, AOT all but `wpo_weighting`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsepo.losses.common import check, sigmoid_loss
from sparsepo.losses.knobs import (CDPOKnob, LDKnob, PairKnobs, SFTKnob, output_with_knobs, pair_logratios,
                                   sequence_logps)
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class APOParams(PairKnobs):
    beta: float = 0.1
    """β: scale of the log-ratios inside the sigmoids (TRL default 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "APOParams", f"beta must be > 0 (got {self.beta})")


def apo_zero_loss(inputs: LossInputs, params: APOParams) -> LossOutput:
    """APO-zero: raise the chosen likelihood and lower the rejected one, each anchored at the reference.

        loss = (1 − σ(β·a)) + σ(β·b)

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment" (arXiv 2408.06266), Eq. 7; TRL `apo_zero`. For when
    the chosen responses are better than the model's own outputs. Default β=0.1.
    """
    a, b = pair_logratios(inputs, params, "apo_zero")
    losses = (1.0 - torch.sigmoid(params.beta * a)) + torch.sigmoid(params.beta * b)
    return output_with_knobs(inputs, params, "apo_zero", losses, params.beta * a, params.beta * b)


def apo_down_loss(inputs: LossInputs, params: APOParams) -> LossOutput:
    """APO-down: lower the chosen likelihood, and the rejected one more.

        loss = σ(β·a) + (1 − σ(β·Δ))

    D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8; TRL `apo_down`. For when the chosen
    responses are worse than the model's own outputs: the first term pushes the chosen log-ratio
    down, so raising the chosen likelihood alone can raise this loss (by design). Default β=0.1.
    """
    a, b = pair_logratios(inputs, params, "apo_down")
    losses = torch.sigmoid(params.beta * a) + (1.0 - torch.sigmoid(params.beta * (a - b)))
    return output_with_knobs(inputs, params, "apo_down", losses, params.beta * a, params.beta * b)


BASELINES = ("batch_mean", "none")


@dataclass(kw_only=True)
class BCOParams(PairKnobs):
    beta: float = 0.1
    """β: scale of the rewards r = β·(log πθ − log πref) (TRL default 0.1)."""
    baseline: str = "batch_mean"
    """δ, the reward shift: "batch_mean" = the detached mean of the micro-batch's 2B rewards (the paper's
    δ estimated on this micro-batch alone; TRL's running mean equals it on the first step); "none" = δ=0,
    what TRL's `bco_pair` does since its DPO refactor (#3906)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "BCOParams", f"beta must be > 0 (got {self.beta})")
        check(self.baseline in BASELINES, "BCOParams",
              f"baseline must be one of {', '.join(BASELINES)} (got {self.baseline!r})")


def bco_pair_loss(inputs: LossInputs, params: BCOParams) -> LossOutput:
    """Pairwise BCO: chosen and rejected classified separately as good / bad around a reward shift δ.

        r = β·(log πθ − log πref);  loss = −log σ(r(yw) − δ) − log σ(−(r(yl) − δ))

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment" (arXiv
    2404.04656), the BCO loss with reward shift δ (§3); TRL `bco_pair`. The paper's δ is a running
    mean of past rewards, which is trainer state; a pure loss cannot hold it, so δ here is the
    detached mean of this micro-batch's rewards (with gradient accumulation or several ranks, each
    micro-batch uses its own mean; TRL's running mean of per-step means agrees only on step 1), or 0
    (`baseline="none"`). Defaults β=0.1, baseline="batch_mean".
    """
    a, b = pair_logratios(inputs, params, "bco_pair")
    rw, rl = params.beta * a, params.beta * b
    if params.baseline == "batch_mean":
        delta = torch.cat([rw, rl]).mean().detach()
    else:
        delta = torch.zeros((), dtype=rw.dtype, device=rw.device)
    losses = -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))
    return output_with_knobs(inputs, params, "bco_pair", losses, rw, rl, reward_baseline=delta)


@dataclass(kw_only=True)
class AOTParams(LDKnob, SFTKnob, CDPOKnob):
    """β, label_smoothing (cDPO on the sorted margins, as TRL's AOT), ld_alpha and sft_weight. No
    wpo_weighting: AOT's losses are order statistics of the micro-batch, not pairs, so a pair's
    weight has no loss to multiply (the key is refused as unknown)."""

    beta: float = 0.1
    """β of DPO (TRL default 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "AOTParams", f"beta must be > 0 (got {self.beta})")


def aot_loss(inputs: LossInputs, params: AOTParams) -> LossOutput:
    """AOT (paired): first-order stochastic dominance of the policy's pair margins over the reference's.

        u = sort(log πθ(yw) − log πθ(yl)),  v = sort(log πref(yw) − log πref(yl))   (ascending, over B)
        loss_i = −(1−ε)·log σ(β·(u_i − v_i)) − ε·log σ(−β·(u_i − v_i))

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport" (arXiv
    2406.05882), the paired AOT objective with the logistic loss (one-dimensional OT = sorting, §4);
    TRL `aot`. Rewards are DPO's β·a, β·b per pair (unsorted). Defaults β=0.1, ε=0.

    Batch-coupled: the sort runs across the B pairs of one micro-batch (per rank, per accumulation
    step), so losses[i] belongs to the i-th order statistic, not to pair i, and only their mean is
    meaningful. Larger micro-batches match finer quantiles; with B=1 it is DPO (cDPO with ε).
    """
    pw, pl, rw, rl = sequence_logps(inputs, params, "aot")
    u, _ = torch.sort(pw - pl)
    v, _ = torch.sort(rw - rl)
    losses = sigmoid_loss(params.beta * (u - v), params.label_smoothing)
    return output_with_knobs(inputs, params, "aot", losses, params.beta * (pw - rw), params.beta * (pl - rl))


def aot_pair_loss(inputs: LossInputs, params: AOTParams) -> LossOutput:
    """AOT (unpaired): the chosen log-ratios' distribution should dominate the rejected ones'.

        loss_i = −(1−ε)·log σ(β·(sort(a)_i − sort(b)_i)) − ε·log σ(−β·(sort(a)_i − sort(b)_i))

    Melnyk et al. 2024 (arXiv 2406.05882), the unpaired AOT objective (§4); TRL's `aot_pair`, renamed
    `aot_unpaired` in TRL (#5038). Rewards β·a, β·b per pair (unsorted). Defaults β=0.1, ε=0.
    Batch-coupled like `aot_loss` (sorting within one micro-batch); with B=1 it is DPO too.
    """
    return _aot_unpaired(inputs, params, "aot_pair")


def aot_unpaired_loss(inputs: LossInputs, params: AOTParams) -> LossOutput:
    """`aot_pair` under TRL 1.16's name (`loss_type="aot_unpaired"`): the same loss, params and inputs."""
    return _aot_unpaired(inputs, params, "aot_unpaired")


def _aot_unpaired(inputs: LossInputs, params: AOTParams, method: str) -> LossOutput:
    a, b = pair_logratios(inputs, params, method)
    a_sorted, _ = torch.sort(a)
    b_sorted, _ = torch.sort(b)
    losses = sigmoid_loss(params.beta * (a_sorted - b_sorted), params.label_smoothing)
    return output_with_knobs(inputs, params, method, losses, params.beta * a, params.beta * b)
