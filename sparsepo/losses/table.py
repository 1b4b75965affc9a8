"""The method table: one row per method, naming its loss, its hyper-parameters and what it reads.

The trainer reads the flags (or `required_fields`) to decide what to compute and never branches on
a method's name. Adding a method = one file with its params + loss, and one row here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass
from typing import Callable

from sparsepo.losses.anchored import (
    AOTParams,
    APOParams,
    BCOParams,
    aot_loss,
    aot_pair_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
)
from sparsepo.losses.combined import combined_loss, combined_params_cls
from sparsepo.losses.cpo import (AlphaPOParams, CPOMarginParams, CPOParams, alphapo_loss, cpo_hinge_loss,
                                 cpo_ipo_loss, cpo_loss)
from sparsepo.losses.dpo import DPOParams, dpo_loss
from sparsepo.losses.fpo import FPOParams, fpo_loss
from sparsepo.losses.ipo import IPOParams, ipo_loss
from sparsepo.losses.orpo import ORPOParams, orpo_loss
from sparsepo.losses.pairwise import (
    DiscoPOPParams,
    ExoParams,
    HingeParams,
    NCAParams,
    RobustParams,
    SigmoidNormParams,
    SPPOParams,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    nca_pair_loss,
    robust_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)
from sparsepo.losses.sepo import SePOParams, sepo_loss
from sparsepo.losses.sft import SFTParams, sft_loss
from sparsepo.losses.simpo import SimPOParams, simpo_loss
from sparsepo.losses.spo import SPOParams, spo_loss
from sparsepo.losses.tdpo import TDPOParams, tdpo1_loss, tdpo2_loss
from sparsepo.losses.types import LossInputs, LossOutput

BASE_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "chosen_mask", "rejected_mask")
"""Required by LossInputs' constructor, so always present; a loss may read any of them."""

FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "needs_reference": ("ref_chosen_logps", "ref_rejected_logps"),
    "needs_token_logps": ("policy_chosen_token_logps", "policy_rejected_token_logps"),
    "needs_ref_distributions": ("ref_chosen_topk_logps", "policy_chosen_topk_logps",
                                "ref_rejected_topk_logps", "policy_rejected_topk_logps"),
    "needs_sae_features": ("policy_chosen_features", "policy_rejected_features",
                           "ref_chosen_feature_ids", "ref_chosen_feature_values",
                           "ref_rejected_feature_ids", "ref_rejected_feature_values"),
    "needs_oracle_scores": ("chosen_oracle_scores", "rejected_oracle_scores", "chosen_eos_mask", "rejected_eos_mask"),
    "needs_ref_token_logps": ("ref_chosen_token_logps", "ref_rejected_token_logps"),
    "needs_sq_mass": ("policy_chosen_log_sq_mass", "policy_rejected_log_sq_mass"),
    "needs_policy_samples": ("sample_mask", "ref_sample_topk_logps", "policy_sample_topk_logps",
                             "ref_sample_token_logps", "policy_sample_token_logps"),
}
"""The optional LossInputs fields each flag promises. A loss reads every field its flags promise and
no optional field they do not (tests/test_losses.py checks both directions)."""
SITUATIONAL_FIELDS: dict[str, str] = {"old_sample_token_logps": "needs_policy_samples"}
"""Fields a flag's loss reads when they are given and does without when they are None: SPO's π_old
log-probs exist only for a stale sample round (generation.staleness ≥ 1 or every_steps > 1)."""
SUBSTITUTE_FIELDS: dict[str, str] = {"chosen_oracle_scores": "chosen_oracle_selection",
                                     "rejected_oracle_scores": "rejected_oracle_selection"}
"""Promised fields that another field may stand in for: live mode hands SePO the oracle's selection
(made by the reference group with `sepo.sepo_selection`), not its scores."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    """The config name (`method.name`)."""
    loss_fn: Callable[[LossInputs, object], LossOutput]
    """loss_fn(inputs, params) -> LossOutput."""
    params_cls: type
    """The hyper-parameter dataclass; `params_cls()` gives the paper defaults."""
    needs_reference: bool
    """Reference sequence log-probs of the pair (ref_{chosen,rejected}_logps)."""
    needs_token_logps: bool
    """The policy's per-token log-probs (policy_{chosen,rejected}_token_logps), not only their sums."""
    needs_ref_distributions: bool
    """The reference's sparse top-K next-token log-probs on the pair's responses, and the policy's
    log-probs gathered at the same ids (ref_/policy_{chosen,rejected}_topk_logps)."""
    needs_sae_features: bool
    """Policy SAE features pooled over each response, and the reference's pooled top-k (an SAE is loaded)."""
    needs_oracle_scores: bool
    """Oracle token scores on the pair's responses ({chosen,rejected}_oracle_scores; the oracle pair is
    loaded), and where each response's eos is ({chosen,rejected}_eos_mask, from the batch's ids)."""
    needs_policy_samples: bool
    """Samples generated by the policy during training and scored by the reference on request: both
    sides' log-probs at the KL's support ids and at the sampled tokens (sample_mask,
    ref_/policy_sample_topk_logps, ref_/policy_sample_token_logps). Never precomputable."""
    needs_ref_token_logps: bool
    """The reference's per-token log-probs on the pair (ref_{chosen,rejected}_token_logps; the reference
    serves `token_logps`). No row sets it: a row's `ld_alpha` adds it (`get_method(name, params)`, `losses/knobs.py`)."""
    needs_sq_mass: bool
    """The policy's log Σ_v πθ(v)² at each response position (policy_{chosen,rejected}_log_sq_mass),
    computed in its forward only when asked. No row sets it: a row's `wpo_weighting` adds it."""
    length_normalised: bool
    """Rewards divide sequence log-probs by |y|."""
    paper: str
    """Citation: authors, title, arXiv id, equation."""

    @property
    def reference_outputs(self) -> tuple[str, ...]:
        """The `ReferenceOutputs` fields this method needs from the reference side (cache, inline
        scorer or live group), derived from the flags. Policy samples are scored on request, not here."""
        out: list[str] = []
        if self.needs_reference:
            out.append("seq_logps")
        if self.needs_ref_token_logps:
            out.append("token_logps")
        if self.needs_ref_distributions and not self.needs_policy_samples:
            out += ["topk_ids", "topk_logps"]
        if self.needs_sae_features:
            out += ["feature_ids", "feature_values"]
        if self.needs_oracle_scores:
            out.append("oracle_scores")
        return tuple(out)

    @property
    def required_fields(self) -> tuple[str, ...]:
        """The LossInputs fields this method's loss reads, derived from the flags."""
        fields = list(BASE_FIELDS)
        for flag, names in FLAG_FIELDS.items():
            if getattr(self, flag):
                fields.extend(names)
        return tuple(fields)


def _row(name: str, loss_fn: Callable, params_cls: type, paper: str, **flags: bool) -> MethodSpec:
    unknown = set(flags) - set(FLAG_FIELDS) - {"length_normalised"}
    if unknown:
        raise TypeError(f"unknown flags for method '{name}': {sorted(unknown)}")
    values = {flag: flags.get(flag, False) for flag in (*FLAG_FIELDS, "length_normalised")}
    return MethodSpec(name=name, loss_fn=loss_fn, params_cls=params_cls, paper=paper, **values)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _row("dpo", dpo_loss, DPOParams, "Rafailov et al. 2023, Direct Preference Optimization, arXiv 2305.18290, Eq. 7",
             needs_reference=True),
        _row("ipo", ipo_loss, IPOParams, "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning "
             "from Human Preferences, arXiv 2310.12036, Eq. 17", needs_reference=True, length_normalised=True),
        _row("simpo", simpo_loss, SimPOParams, "Meng, Xia & Chen 2024, SimPO: Simple Preference Optimization with "
             "a Reference-Free Reward, arXiv 2405.14734, Eq. 6", length_normalised=True),
        _row("tdpo1", tdpo1_loss, TDPOParams, "Zeng et al. 2024, Token-level Direct Preference Optimization, "
             "arXiv 2404.11999, §4.3 (TDPO1)", needs_reference=True, needs_ref_distributions=True),
        _row("tdpo2", tdpo2_loss, TDPOParams, "Zeng et al. 2024, Token-level Direct Preference Optimization, "
             "arXiv 2404.11999, §4.3 (TDPO2)", needs_reference=True, needs_ref_distributions=True),
        _row("fpo", fpo_loss, FPOParams, "Yin et al. 2024, Direct Preference Optimization Using Sparse "
             "Feature-Level Constraints, arXiv 2411.07618, Eqs. 9-11", needs_reference=True,
             needs_sae_features=True, length_normalised=True),
        _row("sepo", sepo_loss, SePOParams, "Yang et al. 2024, Selective Preference Optimization via Token-Level "
             "Reward Function Estimation, arXiv 2408.13518, §3 (SePO objective)", needs_token_logps=True,
             needs_oracle_scores=True),
        _row("spo", spo_loss, SPOParams, "Sharifnassab et al. 2024, Soft Preference Optimization: Aligning "
             "Language Models to Expert Distributions, arXiv 2405.00747, §3 (SPO loss)", needs_policy_samples=True),
        # the DPO family: TRL DPOTrainer loss types of the same name
        _row("hinge", hinge_loss, HingeParams, "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with "
             "Human Feedback, arXiv 2305.10425, §2 (calibration hinge), on reference log-ratios",
             needs_reference=True),
        _row("robust", robust_loss, RobustParams, "Chowdhury, Kini & Natarajan 2024, Provably Robust DPO: Aligning "
             "Language Models with Noisy Feedback, arXiv 2403.00409, §3 (rDPO loss)", needs_reference=True),
        _row("exo_pair", exo_pair_loss, ExoParams, "Ji et al. 2024, Towards Efficient Exact Optimization of Language "
             "Model Alignment, arXiv 2402.00856, Eq. 16 (EXO-pref)", needs_reference=True),
        _row("nca_pair", nca_pair_loss, NCAParams, "Chen et al. 2024, Noise Contrastive Alignment of Language Models "
             "with Explicit Rewards, arXiv 2402.05369, §3 (pairwise NCA)", needs_reference=True),
        _row("bco_pair", bco_pair_loss, BCOParams, "Jung et al. 2024, Binary Classifier Optimization for Large "
             "Language Model Alignment, arXiv 2404.04656, §3 (BCO with reward shift)", needs_reference=True),
        _row("sppo_hard", sppo_hard_loss, SPPOParams, "Wu et al. 2024, Self-Play Preference Optimization for Language "
             "Model Alignment, arXiv 2405.00675, Eq. 4.7 with hard P", needs_reference=True),
        _row("aot", aot_loss, AOTParams, "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via "
             "Optimal Transport, arXiv 2406.05882, §4 (paired AOT)", needs_reference=True),
        _row("aot_pair", aot_pair_loss, AOTParams, "Melnyk et al. 2024, Distributional Preference Alignment of LLMs "
             "via Optimal Transport, arXiv 2406.05882, §4 (unpaired AOT)", needs_reference=True),
        _row("aot_unpaired", aot_unpaired_loss, AOTParams, "Melnyk et al. 2024, Distributional Preference Alignment of "
             "LLMs via Optimal Transport, arXiv 2406.05882, §4 (unpaired AOT; TRL 1.16's name for aot_pair)",
             needs_reference=True),
        _row("apo_zero", apo_zero_loss, APOParams, "D'Oosterlinck et al. 2024, Anchored Preference Optimization and "
             "Contrastive Revisions, arXiv 2408.06266, Eq. 7", needs_reference=True),
        _row("apo_down", apo_down_loss, APOParams, "D'Oosterlinck et al. 2024, Anchored Preference Optimization and "
             "Contrastive Revisions, arXiv 2408.06266, Eq. 8", needs_reference=True),
        _row("discopop", discopop_loss, DiscoPOPParams, "Lu, Holt, Fanconi, Chan et al. 2024, Discovering Preference "
             "Optimization Algorithms with and for Large Language Models, arXiv 2406.08414, Eq. 5 (LRML)",
             needs_reference=True),
        _row("sigmoid_norm", sigmoid_norm_loss, SigmoidNormParams, "Rafailov et al. 2023, Direct Preference "
             "Optimization, arXiv 2305.18290, Eq. 7, on per-token average log-ratios (TRL sigmoid_norm)",
             needs_reference=True, length_normalised=True),
        # reference-free
        _row("cpo", cpo_loss, CPOParams, "Xu et al. 2024, Contrastive Preference Optimization: Pushing the "
             "Boundaries of LLM Performance in Machine Translation, arXiv 2401.08417, §3 (L_prefer + L_NLL)"),
        _row("cpo_hinge", cpo_hinge_loss, CPOMarginParams, "Xu et al. 2024, arXiv 2401.08417, §3 with SLiC-HF's "
             "hinge (Zhao et al. 2023, arXiv 2305.10425) for L_prefer (TRL CPO loss_type=hinge)"),
        _row("cpo_ipo", cpo_ipo_loss, CPOMarginParams, "Xu et al. 2024, arXiv 2401.08417, §3 with IPO's Eq. 17 (Azar "
             "et al. 2023, arXiv 2310.12036) for L_prefer (TRL CPO loss_type=ipo)", length_normalised=True),
        _row("alphapo", alphapo_loss, AlphaPOParams, "Gupta et al. 2025, AlphaPO: Reward Shape Matters for LLM "
             "Alignment, arXiv 2501.03884, §3 (TRL CPO loss_type=alphapo)", length_normalised=True),
        _row("orpo", orpo_loss, ORPOParams, "Hong, Lee & Thorne 2024, ORPO: Monolithic Preference Optimization "
             "without Reference Model, arXiv 2403.07691, Eqs. 4-7", length_normalised=True),
        _row("sft", sft_loss, SFTParams, "NLL of the chosen response: Ouyang et al. 2022, arXiv 2203.02155, §3.5; "
             "the NLL term of RPO, arXiv 2404.19733 (TRL sft)", length_normalised=True),
    )
}


def get_method(name, params=None) -> MethodSpec:
    """The row for `name`; a ValueError naming the nearest valid method for a typo. A list of names
    is their weighted sum (see `combined_method`). With the run's `params`, the row as that run
    uses it: the flags its knobs add (`params.input_needs()`, e.g. `ld_alpha`, `knobs.py`) are set too, so
    the trainer computes, and every reference source serves, what those knobs read."""
    if isinstance(name, (list, tuple)):
        spec = combined_method(tuple(get_method(n).name for n in name))
    else:
        try:
            spec = METHODS[name]
        except (KeyError, TypeError):
            match = difflib.get_close_matches(str(name).strip().lower(), list(METHODS), n=1, cutoff=0.4)
            hint = f" Did you mean '{match[0]}'?" if match else ""
            raise ValueError(f"unknown method '{name}'.{hint} Valid methods: {', '.join(METHODS)}") from None
    needs = getattr(params, "input_needs", None)
    added = {flag: True for flag, on in (needs() if needs else {}).items() if on and not getattr(spec, flag)}
    return dataclasses.replace(spec, **added) if added else spec


@functools.lru_cache(maxsize=None)
def combined_method(names: tuple[str, ...]) -> MethodSpec:
    """The row `a+b+…`: loss Σ w_i·loss_i (weights in its params), every flag any component sets (so
    the trainer feeds each component what it reads), rewards and length_normalised of the first.
    Cached, so one combination has one params class."""
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"a combined method needs two or more different methods (got {list(names)}); "
                         f"for one method set method.name to its name")
    specs = [METHODS[n] for n in names]
    flags = {flag: any(getattr(s, flag) for s in specs) for flag in FLAG_FIELDS}
    params_cls = combined_params_cls(names, tuple(s.params_cls for s in specs), tuple(s.loss_fn for s in specs))
    return MethodSpec(name="+".join(names), loss_fn=combined_loss, params_cls=params_cls,
                      length_normalised=specs[0].length_normalised,
                      paper="; ".join(f"{s.name}: {s.paper}" for s in specs), **flags)
