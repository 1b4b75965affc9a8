"""ORPO: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
Model" (arXiv 2403.07691), Eqs. 4-7."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsepo.losses.common import check, chosen_nll, make_output, response_lengths
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class ORPOParams:
    beta: float = 0.1
    """λ of the paper (named beta like TRL's `ORPOConfig.beta`): weight of the odds-ratio term next to the
    NLL of the chosen response (paper and TRL default 0.1)."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "ORPOParams", f"beta must be > 0 (got {self.beta})")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x < 0, stable at both ends (Mächler 2012); x is clamped to ≤ −eps of its dtype so
    that an average log-prob of exactly 0 (an empty or certain response) stays finite."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(inputs: LossInputs, params: ORPOParams) -> LossOutput:
    """ORPO: the chosen response's NLL plus λ times a logistic loss on the log odds ratio.

        p̄(y)  = log πθ(y)/|y|                          (length-averaged log-prob, Eq. 4's P_θ)
        log odds(y) = p̄(y) − log(1 − e^{p̄(y)})
        loss = −p̄(yw) + λ·(−log σ(log odds(yw) − log odds(yl)))

    Hong et al. 2024 (arXiv 2403.07691): odds Eq. 4, L_OR Eq. 7, L_ORPO = L_SFT + λ·L_OR Eq. 6; TRL's
    `ORPOTrainer`. The NLL is averaged per chosen response (TRL averages over all chosen tokens of the
    batch; equal for equal lengths). Default λ=0.1.

    Reads: policy_chosen_logps, policy_rejected_logps (B,); chosen_mask, rejected_mask (B,T) for |y|.
    Returns losses (B,), rewards λ·p̄(yw), λ·p̄(yl) (TRL's convention) (B,); metrics "nll", "log_odds".
    """
    pw, pl, mw, ml = inputs.require("orpo", "policy_chosen_logps", "policy_rejected_logps",
                                    "chosen_mask", "rejected_mask")
    avg_w, avg_l = pw / response_lengths(mw), pl / response_lengths(ml)
    log_odds = (avg_w - avg_l) - (log1mexp(avg_w) - log1mexp(avg_l))
    nll = chosen_nll(inputs)
    losses = nll - params.beta * F.logsigmoid(log_odds)
    return make_output(losses, params.beta * avg_w, params.beta * avg_l, nll=nll.mean(), log_odds=log_odds.mean())
