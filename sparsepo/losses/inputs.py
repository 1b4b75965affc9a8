"""`build_loss_inputs`: exactly what a method's table row asks for, from one policy forward and the
reference outputs of the same batch, split into chosen / rejected halves.

Pure tensor code beside the table it reads: the trainer calls it for every method and never
branches on a method's name. Batches hold 2B rows, chosen first; see `types.LossInputs` for shapes.
"""

from __future__ import annotations

from sparsepo.losses.common import gather_logps
from sparsepo.losses.types import LossInputs


def build_loss_inputs(spec, fwd, response_mask, ref=None, policy_features=None, sample_fields=None,
                      eos_mask=None) -> LossInputs:
    """`fwd`: the policy's forward (`seq_logps` (2B,), `token_logps` (2B,T), `log_sq_mass` (2B,T) for
    `needs_sq_mass` (WPO), and for methods that read the
    reference's top-K ids either `logps_at_ids` (2B,T,K) at `ref.topk_ids` (`models.pair_forward(ids=)`)
    or `logits` (2B,T,V));
    `ref`: the reference outputs for the same batch (None for reference-free methods);
    `policy_features`: (2B,F) pooled SAE features of the policy (FPO);
    `sample_fields`: the needs_policy_samples fields (SPO; `sparsepo.policy_samples.PolicySamples.fields`);
    `eos_mask`: (2B,T) 1 on the response tokens that are eos (`eos_positions`; SePO)."""
    b = response_mask.shape[0] // 2
    mask = response_mask
    kw = dict(policy_chosen_logps=fwd.seq_logps[:b], policy_rejected_logps=fwd.seq_logps[b:],
              chosen_mask=mask[:b], rejected_mask=mask[b:])

    def halves(prefix_c, prefix_r, value):
        kw[prefix_c], kw[prefix_r] = value[:b], value[b:]

    if spec.needs_token_logps:
        halves("policy_chosen_token_logps", "policy_rejected_token_logps", fwd.token_logps)
    if spec.needs_sq_mass:
        if getattr(fwd, "log_sq_mass", None) is None:
            raise ValueError(f"method '{spec.name}' needs the policy's log_sq_mass (WPO); the forward did not compute "
                             f"it: call pair_forward(..., sq_mass=True)")
        halves("policy_chosen_log_sq_mass", "policy_rejected_log_sq_mass", fwd.log_sq_mass)
    if spec.needs_sae_features:
        halves("policy_chosen_features", "policy_rejected_features", policy_features)
    if spec.needs_policy_samples:
        if sample_fields is None:
            raise ValueError(f"method '{spec.name}' needs policy samples; none were given")
        kw.update(sample_fields)
    needed = spec.reference_outputs
    if needed and ref is None:
        raise ValueError(f"method '{spec.name}' needs reference outputs {needed}; none were given")
    if "seq_logps" in needed:
        halves("ref_chosen_logps", "ref_rejected_logps", ref.seq_logps)
    if "token_logps" in needed:
        halves("ref_chosen_token_logps", "ref_rejected_token_logps", ref.token_logps)
    if "topk_ids" in needed:
        policy_topk = fwd.logps_at_ids if getattr(fwd, "logps_at_ids", None) is not None \
            else gather_logps(fwd.logits, ref.topk_ids) * mask.unsqueeze(-1)
        halves("ref_chosen_topk_logps", "ref_rejected_topk_logps", ref.topk_logps)
        halves("policy_chosen_topk_logps", "policy_rejected_topk_logps", policy_topk)
    if "oracle_scores" in needed:
        if getattr(ref, "oracle_selection", None) is not None:  # live mode: the group selected already
            halves("chosen_oracle_selection", "rejected_oracle_selection", ref.oracle_selection)
        else:
            halves("chosen_oracle_scores", "rejected_oracle_scores", ref.oracle_scores)
        if eos_mask is None:
            raise ValueError(f"method '{spec.name}' needs the responses' eos positions (eos_mask); none were given")
        halves("chosen_eos_mask", "rejected_eos_mask", eos_mask)
    if "feature_ids" in needed:
        halves("ref_chosen_feature_ids", "ref_rejected_feature_ids", ref.feature_ids)
        halves("ref_chosen_feature_values", "ref_rejected_feature_values", ref.feature_values)
    return LossInputs(**kw)


def eos_positions(input_ids, response_mask, eos_id: int):
    """(2B,T) float 0/1 in response_mask's dtype: 1 on the response tokens whose id is `eos_id`."""
    return ((input_ids == eos_id) & (response_mask != 0)).to(response_mask.dtype)
