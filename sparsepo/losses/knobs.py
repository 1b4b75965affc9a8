"""Knobs that apply across the rows built on the pair's sequence log-ratios (the issue #12 follow-up):
RPO's NLL (`sft_weight`), LD-DPO's length desensitisation (`ld_alpha`), WPO's pair weights
(`wpo_weighting`, `wpo_clip`), cDPO's label smoothing (`label_smoothing`, sigmoid rows only) and
f-DPO's divergence (`f_divergence_type`, `f_alpha_divergence_coef`, the rows TRL allows it on).

Each knob is a dataclass mixin holding its field: a row takes a knob by inheriting its mixin, and a
row that does not refuses the key as unknown (`method.<key>`). All of them are validated in one
function (`check_knobs`, run by every row's `__post_init__` through `super()`), say in one method
which extra inputs they read (`Knobs.input_needs`, read by `table.get_method(name, params)`, so
with every knob off nothing extra is computed or served), and are applied in two places every row
goes through: `sequence_logps` / `pair_logratios` (LD-DPO, where a row reads the pair's sequence
log-probs) and `output_with_knobs` (WPO's weight and RPO's NLL, where it returns). The maths are
pure functions of the per-token tensors (B,T) and masks (B,T) of `types.LossInputs`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsepo.losses.common import check, chosen_nll, make_output, masked_mean, masked_sum
from sparsepo.losses.types import LossInputs, LossOutput

PAIR = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LD_FIELDS = (*PAIR, "policy_chosen_token_logps", "policy_rejected_token_logps",
             "ref_chosen_token_logps", "ref_rejected_token_logps", "chosen_mask", "rejected_mask")
WPO_FIELDS = ("policy_chosen_token_logps", "policy_rejected_token_logps",
              "policy_chosen_log_sq_mass", "policy_rejected_log_sq_mass", "chosen_mask", "rejected_mask")


class Knobs:
    """Base of the knob mixins (no fields of its own): checks whichever knobs the row has, and
    names the inputs they add. A row's own `__post_init__` calls `super().__post_init__()`."""

    def __post_init__(self) -> None:
        check_knobs(self)

    @property
    def desensitised(self) -> bool:
        """LD-DPO is on: the row takes ld_alpha, and it is set and not 1."""
        alpha = getattr(self, "ld_alpha", None)
        return alpha is not None and alpha != 1.0

    def input_needs(self) -> dict[str, bool]:
        """The table flags these knobs add to the row (`table.get_method(name, params)`): nothing when
        they are off, so the row computes and serves exactly what it does without them."""
        wpo = bool(getattr(self, "wpo_weighting", False))
        return {"needs_token_logps": self.desensitised or wpo, "needs_ref_token_logps": self.desensitised,
                "needs_sq_mass": wpo}


@dataclass(kw_only=True)
class SFTKnob(Knobs):
    sft_weight: float = 0.0
    """α of RPO: weight of the chosen response's per-token NLL, −log πθ(yw)/|yw|, added to each pair's
    loss (RPO, Pang et al. 2024, arXiv 2404.19733: 1; TRL's `rpo_alpha`). 0 is the row without it."""


@dataclass(kw_only=True)
class LDKnob(Knobs):
    ld_alpha: float | None = None
    """α of LD-DPO (Liu et al. 2024, arXiv 2409.06411), in [0, 1]: each response's tokens past the
    pair's public length min(|yw|, |yl|) count α times in both the policy's and the reference's
    sequence log-probs (`ld_sequence_logps`), as in TRL 1.16's `ld_alpha`. None or 1 is the row without
    it and reads nothing extra; any other value needs both sides' per-token log-probs (the reference
    serves `token_logps`). The paper tunes α per model in [0, 1]."""


@dataclass(kw_only=True)
class WPOKnob(Knobs):
    wpo_weighting: bool = False
    """WPO (Zhou et al. 2024, arXiv 2406.11827): weigh each pair's loss by the detached w(x,yw)·w(x,yl)
    of `wpo_weights` (TRL's `use_weighting`); needs the policy's per-token log Σ_v πθ(v)², computed in
    the policy forward only when this is on. False is the row without it."""
    wpo_clip: float | None = None
    """Upper bound on WPO's pair weight: None (default) leaves it uncapped, as the paper and TRL 1.16
    do; 1.0 is what sparsepo did before this knob existed (a checkpoint written then with
    wpo_weighting on resumes only with wpo_clip=1.0, `absent_key_value`)."""

    @staticmethod
    def absent_key_value(key: str, old: dict):
        """What `key`, absent from an older checkpoint's `method` section `old`, meant there: that
        sparsepo capped WPO's weight at 1, so a WPO run written then had wpo_clip=1.0. Anything else:
        `MISSING` (the key's default)."""
        if key == "wpo_clip" and old.get("wpo_weighting"):
            return 1.0
        return MISSING


@dataclass(kw_only=True)
class CDPOKnob(Knobs):
    label_smoothing: float = 0.0
    """ε of conservative DPO (cDPO, Mitchell 2023): the probability that a preference label is flipped,
    in [0, 0.5), on a row's logistic term: −(1−ε)·log σ(z) − ε·log σ(−z). 0 is no smoothing."""


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(kw_only=True)
class FDivKnob(Knobs):
    f_divergence_type: str = "reverse_kl"
    """f-DPO (Wang et al. 2023, arXiv 2309.16240): the divergence from the reference that the implicit
    reward inverts, one of reverse_kl (DPO; default), forward_kl, js_divergence, alpha_divergence
    (TRL 1.16's `f_divergence_type`; `f_scores`). Taken by the rows whose loss is a function of the
    chosen-minus-rejected reward difference, as in TRL: dpo, ipo, hinge, robust, exo_pair, discopop,
    sigmoid_norm; the others (nca_pair, bco_pair, apo_*, sppo_hard, aot*) read each reward on its own,
    where f-DPO's β·log Z(x) does not cancel, and refuse the key as unknown."""
    f_alpha_divergence_coef: float = 0.5
    """TRL's α of alpha_divergence (default 0.5): the score is (u^{α−1} − 1)/(α − 1) of u = πθ/πref,
    i.e. the paper's α-divergence with its α equal to 1 − this value (they agree at 0.5); 1 is reverse_kl,
    0 is forward_kl. Read only with f_divergence_type=alpha_divergence."""


@dataclass(kw_only=True)
class PairKnobs(WPOKnob, LDKnob, SFTKnob):
    """sft_weight, ld_alpha and wpo_weighting: the knobs of every row whose loss is a function of the
    pair's sequence log-ratios and is a sum of per-pair terms."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_knobs(params) -> None:
    """ValueError "<Params>: <key> must ..." for the first knob of `params` out of range (nan fails)."""
    owner = type(params).__name__
    if isinstance(params, SFTKnob):
        check(_number(params.sft_weight) and params.sft_weight >= 0, owner,
              f"sft_weight must be >= 0 (got {params.sft_weight!r}); 0 is the row without the NLL term")
    if isinstance(params, LDKnob):
        check(params.ld_alpha is None or (_number(params.ld_alpha) and 0.0 <= params.ld_alpha <= 1.0), owner,
              f"ld_alpha must be null or in [0, 1] (got {params.ld_alpha!r}); null or 1 is the row without it")
    if isinstance(params, WPOKnob):
        check(isinstance(params.wpo_weighting, bool), owner,
              f"wpo_weighting must be true or false (got {params.wpo_weighting!r})")
    if isinstance(params, WPOKnob):
        check(params.wpo_clip is None or (_number(params.wpo_clip) and params.wpo_clip > 0), owner,
              f"wpo_clip must be null (no cap, TRL 1.16) or > 0 (got {params.wpo_clip!r})")
    if isinstance(params, FDivKnob):
        check(params.f_divergence_type in F_DIVERGENCES, owner,
              f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)} (got {params.f_divergence_type!r})")
        check(_number(params.f_alpha_divergence_coef) and math.isfinite(params.f_alpha_divergence_coef), owner,
              f"f_alpha_divergence_coef must be a finite number (got {params.f_alpha_divergence_coef!r})")
    if isinstance(params, CDPOKnob):  # robust and exo_pair own an ε of their own
        check(_number(params.label_smoothing) and 0.0 <= params.label_smoothing < 0.5, owner,
              f"label_smoothing must be in [0, 0.5) (got {params.label_smoothing!r}); 0 is no smoothing")


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
    α does. TRL 1.16's `ld_alpha` desensitises both sides alike (its reference forward reuses the
    policy's shared/tail masks), as here.

    Reads the four sequence log-probs (B,), the policy's and the reference's token log-probs (B,T)
    and the masks (B,T)."""
    pw, pl, rw, rl, tw, tl, rtw, rtl, mw, ml = inputs.require(method, *LD_FIELDS)
    ew, el = excess_masks(mw, ml)
    cut = 1.0 - alpha
    return (pw - cut * masked_sum(tw, ew), pl - cut * masked_sum(tl, el),
            rw - cut * masked_sum(rtw, ew), rl - cut * masked_sum(rtl, el))


def wpo_weights(inputs: LossInputs, method: str, clip: float | None = None) -> Tensor:
    """WPO's per-pair weight (B,), detached: w(x, yw) · w(x, yl), capped at `clip` when it is set, with

        w(x, y) = exp( (1/|y|) Σ_t log[ πθ(y_t | x, y_<t) / Σ_{v∈V} πθ(v | x, y_<t)² ] )

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization" (arXiv
    2406.11827), §3, Eq. 2 (the sampled weight alignment, as TRL cites it): the length-normalised
    probability of the response under the current policy, each token's probability divided by
    Σ_v πθ(v)², the probability the policy gives a token sampled from itself, so on-policy outputs
    weigh about 1. The loss is w·ℓ with w under stop-gradient. Neither the paper nor TRL 1.16
    (`use_weighting`) caps w, so a pair whose responses the policy likes better than its own samples
    weighs more than 1; `clip` (the row's `wpo_clip`) caps it. Both terms of a token come from the
    same predicting distribution (position t's log Σ_v πθ(v)² is `policy_*_log_sq_mass[t]`).

    Reads the policy's token log-probs (B,T), its log Σ_v πθ(v)² per position (B,T) and the masks."""
    tw, tl, sw, sl, mw, ml = inputs.require(method, *WPO_FIELDS)
    with torch.no_grad():
        log_w = masked_mean(tw.detach() - sw.detach(), mw) + masked_mean(tl.detach() - sl.detach(), ml)
        return torch.exp(log_w if clip is None else log_w.clamp(max=math.log(clip)))


def f_scores(a: Tensor, b: Tensor, params) -> tuple[Tensor, Tensor]:
    """f-DPO's scores (f'(u_w), f'(u_l)) of the log-ratios a = log u_w, b = log u_l (u = πθ/πref),
    each (B,): the implicit reward of f-DPO is β·f'(u) + const, so the rows that take `FDivKnob` put
    f'(u_w) − f'(u_l) where DPO puts a − b.

        reverse_kl        f'(u) = log u                           (DPO; returns a, b themselves)
        forward_kl        f'(u) = 1 − 1/u
        js_divergence     f'(u) = log(2u/(1+u)) = log 2 + log σ(log u)
        alpha_divergence  f'(u) = (u^{c−1} − 1)/(c − 1),  c = f_alpha_divergence_coef (c = 1: log u)

    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints" (arXiv 2309.16240), Thm. 1 and Table 1 (the paper's α-divergence f'(u) =
    (1 − u^{−α})/α is the last line with α = 1 − c). As TRL 1.16's DPOTrainer: c within 1e-6 of 1 is
    reverse_kl, and (c − 1)·log u is capped at 80 before exp (TRL's cap for float32/bf16; TRL has no
    float64 entry, here the cap holds for every dtype). Rows without the knob get (a, b) back."""
    kind = getattr(params, "f_divergence_type", "reverse_kl")
    if kind == "reverse_kl":
        return a, b
    if kind == "forward_kl":
        return 1.0 - torch.exp(-a), 1.0 - torch.exp(-b)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(a), math.log(2.0) + F.logsigmoid(b)
    coef = params.f_alpha_divergence_coef
    if abs(coef - 1.0) < 1e-6:
        return a, b
    return tuple(torch.expm1(((coef - 1.0) * x).clamp(max=80.0)) / (coef - 1.0) for x in (a, b))


def sequence_logps(inputs: LossInputs, params: Knobs, method: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log πθ(yw), log πθ(yl), log πref(yw), log πref(yl)), each (B,): the four sequence log-probs
    (Σ over response tokens), or LD-DPO's desensitised ones when the row's ld_alpha is on. Every
    row on sequence log-probs reads them here, so LD-DPO is applied in this one place."""
    if params.desensitised:
        return ld_sequence_logps(inputs, params.ld_alpha, method)
    return inputs.require(method, *PAIR)


def pair_logratios(inputs: LossInputs, params: Knobs, method: str) -> tuple[Tensor, Tensor]:
    """(a, b) = (log πθ(yw) − log πref(yw), log πθ(yl) − log πref(yl)), each (B,), from `sequence_logps`."""
    pw, pl, rw, rl = sequence_logps(inputs, params, method)
    return pw - rw, pl - rl


def output_with_knobs(inputs: LossInputs, params: Knobs, method: str, losses: Tensor, chosen_rewards: Tensor,
                      rejected_rewards: Tensor, **metrics: Tensor) -> LossOutput:
    """The row's LossOutput from its per-pair preference losses (B,), with the knobs that act on the loss:

        loss = w·(ℓ + α·(−log πθ(yw)/|yw|))

    w is WPO's detached pair weight when the row's wpo_weighting is on (`wpo_weights`, capped at the
    row's wpo_clip; metric "wpo_weight", its batch mean), else 1; α is the row's sft_weight (RPO;
    metric "nll" when α > 0), on the plain sequence log-prob even under LD-DPO (the NLL is the
    response's, not a preference term). w multiplies the NLL too, as TRL 1.16 weighs every term of
    `loss_type=[sigmoid, sft]` (its RPO): a row with sft_weight=α is `[row, sft]` with weights [1, α].
    Rewards and metrics are detached by `make_output`."""
    if getattr(params, "desensitised", False):  # TRL logs LD-DPO's desensitised log-probs as logps/*
        pw, pl, _, _ = ld_sequence_logps(inputs, params.ld_alpha, method)
        metrics["logps/chosen"], metrics["logps/rejected"] = pw.mean(), pl.mean()
    nll = chosen_nll(inputs) if getattr(params, "sft_weight", 0.0) else None
    if nll is not None:
        losses, metrics["nll"] = losses + params.sft_weight * nll, nll.mean()
    if getattr(params, "wpo_weighting", False):
        weights = wpo_weights(inputs, method, params.wpo_clip)
        losses, metrics["wpo_weight"] = weights * losses, weights.mean()
    return make_output(losses, chosen_rewards, rejected_rewards, **metrics)
