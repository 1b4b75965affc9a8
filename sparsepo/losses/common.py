"""Shared pieces of the losses. The log-prob primitives (gather_logps, token_logps_from_logits,
topk_logps_from_logits, log_sq_mass) live in ``sparsepo.logprobs.plain`` and are importable from here.

Alignment (everywhere): for a padded sequence x of length T, the per-token value at position t
describes x_t and comes from logits[:, t-1]; position 0 has no predicting distribution and holds 0
(top-k ids 0). Response masks are float 0/1 and never 1 at t=0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsepo.logprobs.plain import (  # noqa: F401 - importable from here, where the losses used them
    gather_logps,
    log_sq_mass,
    token_logps_from_logits,
    topk_logps_from_logits,
)
from sparsepo.logprobs.plain import upcast as _upcast
from sparsepo.losses.types import LossOutput


def masked_sum(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Σ mask·x over `dim`; positions where mask is 0 contribute exactly 0 (even if x is inf or nan there)."""
    mask = mask.to(x.dtype)
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Σ mask·x / Σ mask over `dim`; 0 where the mask is empty."""
    total = mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / torch.where(total != 0, total, torch.ones_like(total))


def response_lengths(mask: Tensor) -> Tensor:
    """|y| = mask.sum(-1), with empty responses counted as 1 so that 0/|y| stays 0 instead of nan."""
    lengths = mask.sum(-1)
    return torch.where(lengths > 0, lengths, torch.ones_like(lengths))


def pool_over_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Average x over the masked positions: x (N,T,F), mask (N,T) -> (N,F); 0 for an empty mask."""
    m = mask.to(x.dtype)
    total = m.sum(-1, keepdim=True)
    return torch.einsum("nt,ntf->nf", m, x) / torch.where(total != 0, total, torch.ones_like(total))


def _log_tail(topk_logps: Tensor) -> Tensor:
    """log(1 − Σ_k exp(topk_logps)), the log-mass outside the K bins, floored at machine epsilon.

    A tail below eps cannot be resolved from 1 − Σ anyway; the floor keeps the log finite when the
    top-K hold (numerically) all the mass, or when rounding makes Σ exceed 1.
    """
    eps = torch.finfo(topk_logps.dtype).eps
    head = torch.logsumexp(topk_logps, dim=-1).clamp(max=math.log1p(-eps))
    return torch.log(-torch.expm1(head))


def sparse_kl(p_topk_logps: Tensor, q_topk_logps: Tensor) -> Tensor:
    """KL(p ‖ q) between two next-token distributions coarsened onto K+1 bins: (…,K), (…,K) -> (…).

    Bins: the K token ids both tensors refer to (the same ids, in the same order) and one tail bin
    holding the rest of the vocabulary, mass 1 − Σ_k exp(logp_k). Then
        KL = Σ_k p_k (log p_k − log q_k) + p_tail (log p_tail − log q_tail).
    Coarsening a distribution pair can only lose information, so by the data-processing inequality
    this is a lower bound of the full-vocabulary KL; it is exact when the K ids hold all the mass of
    both distributions (e.g. K = V), and close when the tail is small. Computed in float32 at least;
    tails are floored at machine epsilon (see `_log_tail`).
    """
    if p_topk_logps.shape != q_topk_logps.shape:
        raise ValueError(f"sparse_kl: shapes differ, {tuple(p_topk_logps.shape)} vs {tuple(q_topk_logps.shape)}")
    dtype = torch.promote_types(_upcast(p_topk_logps).dtype, _upcast(q_topk_logps).dtype)
    p, q = p_topk_logps.to(dtype), q_topk_logps.to(dtype)
    p_probs = p.exp()
    head = torch.where(p_probs > 0, p_probs * (p - q), torch.zeros((), dtype=dtype, device=p.device)).sum(-1)
    log_p_tail, log_q_tail = _log_tail(p), _log_tail(q)
    return head + log_p_tail.exp() * (log_p_tail - log_q_tail)


def pooled_union_mse(policy_features: Tensor, ref_ids: Tensor, ref_values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """FPO's feature distance D_F = (1/k)·Σ_{i∈I} (c̄θ,i − c̄ref,i)², I = topk(c̄θ) ∪ ref_ids.

    policy_features (B,F) dense pooled activations; ref_ids (B,k') long and ref_values (B,k') the
    reference's pooled top-k (ids unique per row; every other reference feature counts as 0).
    Returns mse (B,) and union_size (B,) long = |I|. The policy's top-k (k capped at F) is a
    selection, so gradient flows only through the values at I.
    """
    if policy_features.dim() != 2 or ref_ids.shape != ref_values.shape or ref_ids.shape[0] != policy_features.shape[0]:
        raise ValueError(f"pooled_union_mse wants features (B,F), ids and values (B,k); got "
                         f"{tuple(policy_features.shape)}, {tuple(ref_ids.shape)}, {tuple(ref_values.shape)}")
    if k < 1:
        raise ValueError(f"pooled_union_mse: k={k} must be >= 1")
    ref_dense = torch.zeros_like(policy_features).scatter_add(1, ref_ids, ref_values.to(policy_features.dtype))
    union = torch.zeros(policy_features.shape, dtype=torch.bool, device=policy_features.device)
    union.scatter_(1, ref_ids, True)
    top = policy_features.detach().topk(min(k, policy_features.shape[1]), dim=-1).indices
    union.scatter_(1, top, True)
    diff = policy_features - ref_dense
    sq = torch.where(union, diff * diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    return sq.sum(-1) / k, union.sum(-1)


ROUNDING = ("floor", "ceil")


def select_tokens(scores: Tensor, mask: Tensor, rho: float, largest: bool, *, rounding: str = "floor",
                  min_tokens: int = 1, skip_first_token: bool = True, exclude: Tensor | None = None) -> Tensor:
    """SePO selection: in each row keep the `count` candidate tokens with the largest (or smallest)
    score. scores (B,T), mask (B,T) -> (B,T) 0/1 in mask's float dtype.

    Candidates are the masked tokens, less the first response token when `skip_first_token` (the
    authors' code never scores it) and less the positions where `exclude` (B,T) is nonzero (SePO's
    exclude_eos). With N candidates, count = floor(ρ·N) or ceil(ρ·N) (`rounding`),
    raised to `min_tokens` and capped at N. Ties break towards the earlier position; a row with no
    candidate selects nothing.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"select_tokens: rho={rho} must be in (0, 1]")
    if rounding not in ROUNDING:
        raise ValueError(f"select_tokens: rounding={rounding!r} must be one of {', '.join(ROUNDING)}")
    if min_tokens < 0:
        raise ValueError(f"select_tokens: min_tokens={min_tokens} must be >= 0")
    valid = mask != 0
    if skip_first_token:
        first = valid & (valid.long().cumsum(-1) == 1)
        valid = valid & ~first
    if exclude is not None:
        valid = valid & (exclude == 0)
    lengths = valid.sum(-1)
    # the 1e-6 keeps float error in rho·N (100·0.07 = 7.000000000000001; 10·0.7 = 6.999999999999999)
    # from moving the count across an integer
    exact = lengths.double() * rho
    count = (torch.ceil(exact - 1e-6) if rounding == "ceil" else torch.floor(exact + 1e-6)).long()
    count = torch.minimum(count.clamp(min=min_tokens), lengths)
    fill = float("-inf") if largest else float("inf")
    ranked = torch.where(valid, scores.double(), torch.full((), fill, dtype=torch.float64, device=scores.device))
    order = torch.sort(ranked, dim=-1, descending=largest, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    selected = (rank < count.unsqueeze(-1)) & valid
    return selected.to(mask.dtype if mask.is_floating_point() else torch.get_default_dtype())


def sigmoid_loss(logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the Bradley–Terry loss, with cDPO's label smoothing ε."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def chosen_nll(inputs) -> Tensor:
    """−log πθ(yw)/|yw|, (B,): the per-token NLL of each chosen response (RPO, CPO, ORPO's SFT term).

    Per pair, so the batch mean weights pairs equally; TRL's trainers take one cross-entropy over all
    chosen tokens of the batch, which weights long responses more (equal when lengths are equal)."""
    return -inputs.policy_chosen_logps / response_lengths(inputs.chosen_mask)


def make_output(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, **metrics: Tensor) -> LossOutput:
    """Detach the rewards and metrics; add "margin" (mean chosen − rejected) and "accuracy" (chosen > rejected)."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    out = {"margin": (chosen - rejected).mean(), "accuracy": (chosen > rejected).to(chosen.dtype).mean()}
    out.update({name: value.detach() for name, value in metrics.items()})
    return LossOutput(losses=losses, chosen_rewards=chosen, rejected_rewards=rejected, metrics=out)


def check(ok: bool, owner: str, message: str) -> None:
    """Hyper-parameter validation: raise ValueError("owner: message") unless ok (nan fails every check)."""
    if not ok:
        raise ValueError(f"{owner}: {message}")
