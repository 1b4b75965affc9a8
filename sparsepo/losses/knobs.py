"""Two knobs on DPO's sequence log-probs: LD-DPO's length desensitisation and WPO's pair weights.

Pure functions of the per-token tensors (B,T) and masks (B,T) of `types.LossInputs`; `dpo.dpo_loss`
applies them (`DPOParams.ld_alpha`, `DPOParams.wpo_weighting`), and `DPOParams.input_needs` tells the
table which extra inputs they read, so with both knobs off nothing extra is computed or served.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo.losses.common import masked_mean, masked_sum
from sparsepo.losses.types import LossInputs

LD_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
             "policy_chosen_token_logps", "policy_rejected_token_logps",
             "ref_chosen_token_logps", "ref_rejected_token_logps", "chosen_mask", "rejected_mask")
WPO_FIELDS = ("policy_chosen_token_logps", "policy_rejected_token_logps",
              "policy_chosen_log_sq_mass", "policy_rejected_log_sq_mass", "chosen_mask", "rejected_mask")


def excess_masks(chosen_mask: Tensor, rejected_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,T) each, in the masks' dtype: 1 on the response tokens past the pair's public length
    l_p = min(|yw|, |yl|), 0 elsewhere. Tokens are counted along the mask, wherever the response
    sits in the row; the shorter response of a pair has no excess."""
    public = torch.minimum((chosen_mask != 0).sum(-1), (rejected_mask != 0).sum(-1)).unsqueeze(-1)

    def excess(mask: Tensor) -> Tensor:
        on = mask != 0
        return (on & (on.long().cumsum(-1) > public)).to(mask.dtype)  # cumsum: 1 on the first token, 2 ...

    return excess(chosen_mask), excess(rejected_mask)


def ld_sequence_logps(inputs: LossInputs, alpha: float, method: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LD-DPO's desensitised sequence log-probs (pw, pl, rw, rl), each (B,):

        log π̂(y) = Σ_{t ≤ l_p} log π(y_t | x, y_<t) + α · Σ_{t > l_p} log π(y_t | x, y_<t)
                 = log π(y) − (1 − α) · Σ_{t > l_p} log π(y_t | x, y_<t)

    for π = πθ and π = πref alike (t counts response tokens; l_p = min(|yw|, |yl|)). Liu et al.
    2024, "Length Desensitization in Direct Preference Optimization" (arXiv 2409.06411), §4: the
    likelihood of each response split at the pair's public length, the excess tokens' part raised
    to the power α, in both the policy's and the reference's likelihood. Computed in the second
    form, so α = 1 returns the sequence log-probs bit for bit, and on a pair of equal lengths every
    α does. (TRL's `ld_alpha` desensitises the policy's log-probs only; here both sides are, as in
    the paper's objective.)

    Reads the four sequence log-probs (B,), the policy's and the reference's token log-probs (B,T)
    and the masks (B,T)."""
    pw, pl, rw, rl, tw, tl, rtw, rtl, mw, ml = inputs.require(method, *LD_FIELDS)
    ew, el = excess_masks(mw, ml)
    cut = 1.0 - alpha
    return (pw - cut * masked_sum(tw, ew), pl - cut * masked_sum(tl, el),
            rw - cut * masked_sum(rtw, ew), rl - cut * masked_sum(rtl, el))


def wpo_weights(inputs: LossInputs, method: str) -> Tensor:
    """WPO's per-pair weight (B,), detached: w(x, yw) · w(x, yl), clamped at 1, with

        w(x, y) = exp( (1/|y|) Σ_t log[ πθ(y_t | x, y_<t) / Σ_{v∈V} πθ(v | x, y_<t)² ] )

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization" (arXiv
    2406.11827), §3 (Eq. 2 for the alignment, as TRL cites it): the length-normalised probability of the response under the current policy,
    with the paper's sampled weight alignment (each token's probability divided by Σ_v πθ(v)², the
    probability the policy gives a token sampled from itself, so on-policy outputs weigh about 1).
    The loss is w·ℓ with w under stop-gradient. The clamp at 1 is TRL's (`use_weighting`): it
    keeps the reweighting from ever enlarging a pair's step. Both terms of a token come from the same
    predicting distribution (position t's log Σ_v πθ(v)² is `policy_*_log_sq_mass[t]`).

    Reads the policy's token log-probs (B,T), its log Σ_v πθ(v)² per position (B,T) and the masks."""
    tw, tl, sw, sl, mw, ml = inputs.require(method, *WPO_FIELDS)
    with torch.no_grad():
        log_w = masked_mean(tw.detach() - sw.detach(), mw) + masked_mean(tl.detach() - sl.detach(), ml)
        return torch.exp(log_w.clamp(max=0.0))
