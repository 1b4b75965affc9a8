"""SePO: Yang et al. 2024, "Selective Preference Optimization via Token-Level Reward Function
Estimation" (EMNLP 2025, arXiv 2408.13518), §3: the reference-free objective on key tokens."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sparsepo.losses.common import (ROUNDING, check, make_output, masked_sum, response_lengths, select_tokens,
                                    sigmoid_loss)
from sparsepo.losses.types import LossInputs, LossOutput

NORMALISE = ("selected", "response", "none")


@dataclass(kw_only=True)
class SePOParams:
    gamma: float = 1.0
    """γ: scale of the selected-token reward (authors' code: 1)."""
    rho: float = 0.3
    """ρ: fraction of each response's candidate tokens kept (paper and authors' code: 0.3)."""
    rounding: str = "floor"
    """How ρ·N becomes a token count: "floor" (the authors' int(ρ·N)) or "ceil"."""
    min_tokens: int = 1
    """Fewest tokens kept per response (capped at N). Ours 1; the authors' code has no minimum (0),
    see `sepo_loss` for why ours differs."""
    skip_first_token: bool = True
    """Never select a response's first token (the authors' code never scores it)."""
    max_prompt_tokens: int | None = 1900
    """Leave out pairs whose prompt (before truncation) has more tokens (the authors' data step: 1900;
    null: no limit). Listed in the run's skipped_rows.jsonl (`sparsepo.data.filters`)."""
    min_response_tokens: int | None = 8
    """Leave out pairs where either response (eos excluded, before truncation) has fewer tokens (the
    authors': 8; their count includes the tokenizer's bos where it adds one; 0 or null: no limit)."""
    exclude_eos: bool = False
    """Never select a response's eos. The authors' code scores and may select it (their default, and
    ours); see `sepo_loss` for what it does on the demo."""
    normalise: str = "selected"
    """What the selected tokens' log-prob sum is divided by: "selected" (|S|, the mean; default),
    "response" (|y|) or "none" (plain sum). See `sepo_loss`."""

    def __post_init__(self) -> None:
        check(self.gamma > 0, "SePOParams", f"gamma must be > 0 (got {self.gamma})")
        check(0.0 < self.rho <= 1.0, "SePOParams", f"rho must be in (0, 1] (got {self.rho})")
        check(self.rounding in ROUNDING, "SePOParams",
              f"rounding must be one of {', '.join(ROUNDING)} (got {self.rounding!r})")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "SePOParams",
              f"min_tokens must be an integer >= 0 (got {self.min_tokens!r})")
        for name in ("max_prompt_tokens", "min_response_tokens"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 0), "SePOParams",
                  f"{name} must be an integer >= 0 or null (got {value!r})")
        check(self.normalise in NORMALISE, "SePOParams",
              f"normalise must be one of {', '.join(NORMALISE)} (got {self.normalise!r})")


def _selected_reward(token_logps: Tensor, selected: Tensor, mask: Tensor, gamma: float, normalise: str) -> Tensor:
    total = masked_sum(token_logps, selected)
    if normalise == "selected":
        return gamma * total / response_lengths(selected)
    if normalise == "response":
        return gamma * total / response_lengths(mask)
    return gamma * total


def sepo_selection(params: SePOParams, chosen_scores: Tensor, rejected_scores: Tensor, chosen_mask: Tensor,
                   rejected_mask: Tensor, chosen_eos: Tensor, rejected_eos: Tensor) -> tuple[Tensor, Tensor]:
    """SePO's key tokens: the top ρ of each chosen response by oracle score and the bottom ρ of each
    rejected one (`select_tokens` with this run's rounding, minimum, first-token and eos knobs).
    All (B,T); returns (selected chosen, selected rejected), 0/1 in the masks' float dtype. The one
    selection every mode uses: the loss (cache and inline modes) and the live reference group."""
    knobs = dict(rounding=params.rounding, min_tokens=params.min_tokens, skip_first_token=params.skip_first_token)
    sel_w = select_tokens(chosen_scores, chosen_mask, params.rho, largest=True,
                          exclude=chosen_eos if params.exclude_eos else None, **knobs)
    sel_l = select_tokens(rejected_scores, rejected_mask, params.rho, largest=False,
                          exclude=rejected_eos if params.exclude_eos else None, **knobs)
    return sel_w, sel_l


def sepo_loss(inputs: LossInputs, params: SePOParams) -> LossOutput:
    """SePO: a reference-free contrastive loss on the oracle's key tokens only.

        N    = the response's candidate tokens (all but the first when skip_first_token)
        Sw   = the count(ρ·Nw) chosen tokens with the highest oracle score r_t
        Sl   = the count(ρ·Nl) rejected tokens with the lowest r_t
        count(x) = floor(x) (or ceil), at least min_tokens, at most N
        r(y) = γ·mean_{t∈S} log πθ(y_t | x, y<t)
        loss = −log σ(r(yw) − r(yl))

    Yang et al. 2024 (arXiv 2408.13518), §3, the SePO objective; r_t = log π_oracle(y_t) −
    log π_oracle_ref(y_t) is the DPO-trained oracle's token reward (their Theorem 1). Defaults follow
    the authors' code (OpenRLHF fork SteveKGYang/SePO): γ=1, ρ=0.3, floor, first token never selected.

    Their data step drops pairs with a prompt over 1900 tokens or a response under 8; ours too, by
    default (max_prompt_tokens, min_response_tokens: the data pipeline applies them and lists each
    pair left out in skipped_rows.jsonl). Where ours differs, and why: min_tokens=1 (the authors'
    code has none), so that with the filter off a short response still selects a token and
    contributes reward and gradient. On responses of 8+ tokens floor(0.3·7) = 2 >= 1, so the minimum
    never binds and the two agree; set min_tokens=0 for the authors' rule exactly.

    Reading of γ's normalisation (knob `normalise`): Theorem 1 makes the response reward a sum of
    token rewards, and selection keeps the tokens that carry most of it; the objective then scores a
    response, as SimPO does, by the average log-likelihood — of the tokens it optimises, since
    unselected tokens get neither value nor gradient. Dividing by |S| keeps γ's scale independent of ρ
    and of length (|S| ∝ |y|). "response" divides by |y| instead (≈ ρ× smaller rewards, γ rescaled);
    "none" is the unnormalised sum (length-biased).

    The end token (knob `exclude_eos`): the authors' code scores a response's eos like any other
    token, so the bottom ρ of a rejected response may include it (on the demo: in 72-85% of them,
    and almost never in a chosen one), and the loss then only pushes log π(eos) down. exclude_eos=True
    leaves eos out of the candidates on both sides (N then counts the other tokens). On the demo this
    alone does not stop the reference-free policy from drifting into samples that never end; an SFT
    anchor does (`method.name=[sepo, sft]`; docs/benchmarks_sepo_spo.md).

    Reads: policy_{chosen,rejected}_token_logps (B,T); chosen_mask, rejected_mask (B,T);
    chosen_oracle_scores, rejected_oracle_scores (B,T), aligned like token_logps;
    chosen_eos_mask, rejected_eos_mask (B,T). In live mode the reference group has already selected
    (`sepo_selection`) and sends only that: chosen_oracle_selection, rejected_oracle_selection (B,T)
    stand in for the scores, and the oracle_* score metrics are left out (the scores stay on the
    reference side). Only the selected tokens receive gradient. Rewards
    r(yw), r(yl) (B,). Metrics: selected_fraction (selected tokens / response tokens, both sides);
    oracle_{chosen,rejected}_{selected,unselected}: the mean oracle score of the selected and of the
    other response tokens, per side; eos_selected_{chosen,rejected}: the fraction of the responses
    that end in eos whose eos is selected.
    """
    tw, tl, mw, ml = inputs.require(
        "sepo", "policy_chosen_token_logps", "policy_rejected_token_logps", "chosen_mask", "rejected_mask")
    if inputs.chosen_oracle_selection is not None and inputs.rejected_oracle_selection is not None:
        # live mode: the reference group selected with `sepo_selection` and sent only the selection
        sel_w, sel_l, sw, sl = inputs.chosen_oracle_selection, inputs.rejected_oracle_selection, None, None
        ew, el = inputs.require("sepo", "chosen_eos_mask", "rejected_eos_mask")
    else:
        sw, sl, ew, el = inputs.require("sepo", "chosen_oracle_scores", "rejected_oracle_scores",
                                        "chosen_eos_mask", "rejected_eos_mask")
        sel_w, sel_l = sepo_selection(params, sw, sl, mw, ml, ew, el)
    chosen = _selected_reward(tw, sel_w, mw, params.gamma, params.normalise)
    rejected = _selected_reward(tl, sel_l, ml, params.gamma, params.normalise)
    response_tokens = (mw != 0).sum() + (ml != 0).sum()
    fraction = (sel_w.sum() + sel_l.sum()) / response_tokens.clamp(min=1)
    scores = {}
    for side, s, sel, m in (("chosen", sw, sel_w, mw), ("rejected", sl, sel_l, ml)) if sw is not None else ():
        rest = (m != 0).to(sel.dtype) - sel
        scores[f"oracle_{side}_selected"] = _overall_mean(s, sel)
        scores[f"oracle_{side}_unselected"] = _overall_mean(s, rest)
    for side, sel, e in (("chosen", sel_w, ew), ("rejected", sel_l, el)):
        ended = (e != 0).any(-1)
        scores[f"eos_selected_{side}"] = ((sel * e).sum(-1) > 0)[ended].to(sel.dtype).mean() if ended.any() \
            else sel.new_zeros(())
    return make_output(sigmoid_loss(chosen - rejected), chosen, rejected, selected_fraction=fraction, **scores)


def _overall_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over every masked position of the batch; 0 when none."""
    return masked_sum(x, mask).sum() / mask.sum().clamp(min=1)
