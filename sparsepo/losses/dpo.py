"""DPO: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), Eq. 7."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sparsepo.losses.common import check, chosen_nll, make_output, sigmoid_loss
from sparsepo.losses.knobs import ld_sequence_logps, wpo_weights
from sparsepo.losses.types import LossInputs, LossOutput


@dataclass(kw_only=True)
class DPOParams:
    beta: float = 0.1
    """β: inverse strength of the implicit KL constraint to the reference (paper default 0.1)."""
    label_smoothing: float = 0.0
    """ε of conservative DPO (cDPO): the probability that a preference label is flipped; 0 is plain DPO."""
    sft_weight: float = 0.0
    """α of RPO: weight of the chosen response's per-token NLL, −log πθ(yw)/|yw|, added to each pair's
    loss (RPO, Pang et al. 2024: 1; TRL's `rpo_alpha`). 0 is plain DPO."""
    ld_alpha: float | None = None
    """α of LD-DPO (Liu et al. 2024, arXiv 2409.06411), in [0, 1]: each response's tokens past the
    pair's public length min(|yw|, |yl|) count α times in both the policy's and the reference's
    sequence log-probs (`knobs.ld_sequence_logps`). None or 1 is plain DPO and reads nothing extra;
    any other value needs both sides' per-token log-probs (the reference serves `token_logps`).
    The paper tunes α per model in [0, 1] (TRL's `ld_alpha`)."""
    wpo_weighting: bool = False
    """WPO (Zhou et al. 2024, arXiv 2406.11827): weigh each pair's DPO term by the detached
    w(x,yw)·w(x,yl) ≤ 1 of `knobs.wpo_weights` (TRL's `use_weighting`); needs the policy's per-token
    log Σ_v πθ(v)², computed in the policy forward only when this is on. False is plain DPO."""

    def __post_init__(self) -> None:
        check(self.beta > 0, "DPOParams", f"beta must be > 0 (got {self.beta})")
        check(0.0 <= self.label_smoothing < 0.5, "DPOParams",
              f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing}); 0 is plain DPO")
        check(self.sft_weight >= 0, "DPOParams", f"sft_weight must be >= 0 (got {self.sft_weight}); 0 is plain DPO")
        check(self.ld_alpha is None or (isinstance(self.ld_alpha, (int, float)) and not isinstance(self.ld_alpha, bool)
                                        and 0.0 <= self.ld_alpha <= 1.0), "DPOParams",
              f"ld_alpha must be null or in [0, 1] (got {self.ld_alpha!r}); null or 1 is plain DPO")
        check(isinstance(self.wpo_weighting, bool), "DPOParams",
              f"wpo_weighting must be true or false (got {self.wpo_weighting!r})")

    @property
    def desensitised(self) -> bool:
        """LD-DPO is on: ld_alpha set and not 1."""
        return self.ld_alpha is not None and self.ld_alpha != 1.0

    def input_needs(self) -> dict[str, bool]:
        """The table flags these knobs add to the row (`table.get_method(name, params)`): nothing when
        both are off, so plain DPO computes and serves exactly what it did before."""
        return {"needs_token_logps": self.desensitised or self.wpo_weighting,
                "needs_ref_token_logps": self.desensitised, "needs_sq_mass": self.wpo_weighting}


def dpo_rewards(inputs: LossInputs, beta: float, method: str) -> tuple[Tensor, Tensor]:
    """β·(log πθ(y) − log πref(y)) for chosen and rejected, each (B,): DPO's implicit rewards."""
    pw, pl, rw, rl = inputs.require(method, "policy_chosen_logps", "policy_rejected_logps",
                                    "ref_chosen_logps", "ref_rejected_logps")
    return beta * (pw - rw), beta * (pl - rl)


def dpo_loss(inputs: LossInputs, params: DPOParams) -> LossOutput:
    """DPO, with cDPO label smoothing, RPO's NLL term, LD-DPO's length desensitisation and WPO's weights.

        r(y) = β·(log π̂θ(y) − log π̂ref(y))
        loss = w·[−(1−ε)·log σ(r(yw) − r(yl)) − ε·log σ(r(yl) − r(yw))] + α·(−log πθ(yw)/|yw|)

    log π̂ is the plain sequence log-prob, or LD-DPO's Σ_{t≤l_p} + ld_alpha·Σ_{t>l_p} of the token
    log-probs when ld_alpha is set (`knobs.ld_sequence_logps`; the rewards are then the desensitised
    ones); w is 1, or WPO's detached pair weight when wpo_weighting (`knobs.wpo_weights`; it
    weighs the preference term only, not the NLL).

    Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7; ε from Mitchell 2023, "A note on DPO with noisy
    preferences" (cDPO); α (sft_weight) from Pang et al. 2024, "Iterative Reasoning Preference
    Optimization" (arXiv 2404.19733), the DPO+NLL loss (RPO; the paper weights DPO by α with α=1,
    TRL's `rpo_alpha` weights the NLL, as here), the NLL averaged over each chosen response's
    tokens. TRL averages over all chosen tokens of the batch instead, which weights long
    responses more; the two agree when the responses have equal length. Defaults β=0.1, ε=0, α=0.

    Reads: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, all (B,)
    sequence log-probs (Σ over response tokens); chosen_mask (B,T) for |yw| when α > 0. With
    ld_alpha: policy_/ref_{chosen,rejected}_token_logps (B,T) and both masks instead of the reference
    sums. With wpo_weighting: policy_{chosen,rejected}_token_logps and _log_sq_mass (B,T).
    Returns losses (B,), rewards r(yw), r(yl) (B,); metrics "nll" when α > 0, "wpo_weight" (the
    batch mean of w) with wpo_weighting.
    """
    if params.desensitised:
        pw, pl, rw, rl = ld_sequence_logps(inputs, params.ld_alpha, "dpo")
        chosen, rejected = params.beta * (pw - rw), params.beta * (pl - rl)
    else:
        chosen, rejected = dpo_rewards(inputs, params.beta, "dpo")
    losses = sigmoid_loss(chosen - rejected, params.label_smoothing)
    metrics = {}
    if params.wpo_weighting:
        weights = wpo_weights(inputs, "dpo")
        losses, metrics["wpo_weight"] = weights * losses, weights.mean()
    if params.sft_weight:
        nll = chosen_nll(inputs)
        losses, metrics["nll"] = losses + params.sft_weight * nll, nll.mean()
    return make_output(losses, chosen, rejected, **metrics)
