"""Preference-optimisation losses: pure functions of torch tensors (imports torch and stdlib only).

    from sparsepo.losses import LossInputs, get_method
    spec = get_method("dpo")
    out = spec.loss_fn(LossInputs(...fields in spec.required_fields...), spec.params_cls(beta=0.1))
    out.losses.mean().backward()

Tests: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses*.py -q
"""

from sparsepo.losses.common import (
    gather_logps,
    make_output,
    masked_mean,
    masked_sum,
    pool_over_mask,
    pooled_union_mse,
    response_lengths,
    select_tokens,
    chosen_nll,
    sigmoid_loss,
    sparse_kl,
    token_logps_from_logits,
    topk_logps_from_logits,
)
from sparsepo.losses.anchored import (
    AOTParams,
    APOParams,
    BCOParams,
    aot_loss,
    aot_pair_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
)
from sparsepo.losses.cpo import CPOParams, cpo_loss
from sparsepo.losses.sft import SFTParams, sft_loss
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
from sparsepo.losses.sepo import SePOParams, sepo_loss, sepo_selection
from sparsepo.losses.simpo import SimPOParams, simpo_loss
from sparsepo.losses.spo import SPOParams, spo_loss
from sparsepo.losses.table import (BASE_FIELDS, FLAG_FIELDS, METHODS, SITUATIONAL_FIELDS, SUBSTITUTE_FIELDS, MethodSpec,
                                   combined_method, get_method)
from sparsepo.losses.tdpo import TDPOParams, tdpo1_loss, tdpo2_loss
from sparsepo.losses.types import LossInputs, LossOutput

__all__ = [
    "BASE_FIELDS", "FLAG_FIELDS", "SITUATIONAL_FIELDS", "SUBSTITUTE_FIELDS", "METHODS", "MethodSpec", "get_method", "combined_method",
    "LossInputs", "LossOutput",
    "DPOParams", "dpo_loss", "IPOParams", "ipo_loss", "SimPOParams", "simpo_loss",
    "TDPOParams", "tdpo1_loss", "tdpo2_loss", "FPOParams", "fpo_loss",
    "SePOParams", "sepo_loss", "sepo_selection", "SPOParams", "spo_loss",
    "HingeParams", "hinge_loss", "RobustParams", "robust_loss", "ExoParams", "exo_pair_loss",
    "NCAParams", "nca_pair_loss", "SPPOParams", "sppo_hard_loss", "DiscoPOPParams", "discopop_loss",
    "SigmoidNormParams", "sigmoid_norm_loss", "APOParams", "apo_zero_loss", "apo_down_loss",
    "BCOParams", "bco_pair_loss", "AOTParams", "aot_loss", "aot_pair_loss",
    "CPOParams", "cpo_loss", "ORPOParams", "orpo_loss", "SFTParams", "sft_loss",
    "gather_logps", "token_logps_from_logits", "topk_logps_from_logits",
    "masked_sum", "masked_mean", "response_lengths", "pool_over_mask",
    "sparse_kl", "pooled_union_mse", "select_tokens", "sigmoid_loss", "chosen_nll", "make_output",
]
