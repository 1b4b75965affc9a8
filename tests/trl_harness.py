"""Run TRL 1.16's own loss code on tensors we choose, without a model: `DPOTrainer._compute_loss` with a
stand-in model whose forward returns given per-token log-probs, and `CPOTrainer.cpo_loss` as it is.

TRL is never a project dependency: the tests that use this skip unless `trl` imports (e.g.
`pip download trl==1.16.0 --no-deps` unzipped onto PYTHONPATH; see tests/test_losses_trl.py).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


class _Forward(torch.nn.Module):
    """Stands in for TRL's fused-LM-head forward: returns the given (N, T-1) per-token log-probs (and
    log Σp² for WPO) in TRL's shifted layout, whatever ids it is called with."""

    is_gradient_checkpointing = False

    def __init__(self, token_logps, log_sq_mass=None):
        super().__init__()
        self.log_probs, self.log_sum_sq_probs = token_logps, log_sq_mass

    def forward(self, **_):
        zeros = torch.zeros_like(self.log_probs).detach()
        return SimpleNamespace(log_probs=self.log_probs, log_sum_sq_probs=self.log_sum_sq_probs, entropy=zeros,
                               mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None)


def trl_dpo_loss(fields: dict, loss_types, *, beta=0.1, loss_weights=None, label_smoothing=0.0, ld_alpha=None,
                 use_weighting=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                 discopop_tau=0.05, policy_leaf=None):
    """TRL 1.16's DPO loss (a scalar: Σ_k weight_k · mean over pairs) on our LossInputs fields (B pairs,
    (B,T) tensors aligned as `sparsepo.losses.types`: position t is token t, 0 at t = 0).
    `policy_leaf`: a (2B,T) tensor of the policy's token log-probs to differentiate through (chosen first)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    pol = policy_leaf if policy_leaf is not None else torch.cat(
        [fields["policy_chosen_token_logps"], fields["policy_rejected_token_logps"]])
    mask = torch.cat([fields["chosen_mask"], fields["rejected_mask"]])
    sq = (torch.cat([fields["policy_chosen_log_sq_mass"], fields["policy_rejected_log_sq_mass"]])[:, 1:]
          if use_weighting else None)
    ref_tokens = torch.cat([fields["ref_chosen_token_logps"], fields["ref_rejected_token_logps"]])
    inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask}
    # LD-DPO desensitises TRL's reference only when it runs the reference forward itself: use that path then
    precompute = ld_alpha is None
    if precompute:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = fields["ref_chosen_logps"], fields["ref_rejected_logps"]
    policy = _Forward(pol[:, 1:] * mask[:, 1:], sq)  # TRL's head gives 0 (no gradient) where labels are -100
    trainer = SimpleNamespace(
        model=policy, ref_model=_Forward(ref_tokens[:, 1:]), accelerator=_Accelerator(), ld_alpha=ld_alpha,
        precompute_ref_logps=precompute, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)), beta=beta, label_smoothing=label_smoothing,
        use_weighting=use_weighting, args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    return DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)


def trl_cpo_loss(chosen_logps, rejected_logps, loss_type, *, beta=0.1, alpha=0.0, label_smoothing=0.0,
                 simpo_gamma=0.5):
    """TRL 1.16's `CPOTrainer.cpo_loss` -> (losses (B,), chosen_rewards, rejected_rewards). TRL feeds it
    sequence sums for sigmoid/hinge and per-token averages for ipo/simpo (alphapo = simpo with `alpha`);
    the caller passes what TRL would."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(alpha=alpha, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                              simpo_gamma=simpo_gamma, accelerator=_Accelerator())
    return CPOTrainer.cpo_loss(trainer, chosen_logps, rejected_logps)
