"""The plain path: log-probs and the other per-position fields from full (N,T,V) logits.

Alignment (everywhere in ``sparsepo.logprobs``): for a padded sequence x of length T, the value at
position t describes x_t and comes from logits[:, t-1]; position 0 has no predicting distribution
and holds 0 (top-k ids 0). Response masks are float 0/1 and never 1 at t=0.

``fields`` is what ``head.PlainHead`` returns: the same keys, the same numbers as the lean path
(``lean.chunked_logps``) computes from the last hidden state without the full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """float32 for half / bf16 inputs (log-probs need the range); float32 and float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gather_logps(logits: Tensor, ids: Tensor) -> Tensor:
    """log p(ids[n, t, j] | x_<t) from logits[n, t-1]: (N,T,V), (N,T,K) -> (N,T,K); position 0 is 0.

    ids[:, 0] is ignored. To get the token log-probs and the log-probs at the reference's top-K ids
    in one pass over the vocabulary, gather `torch.cat([input_ids[..., None], ref_ids], -1)`.
    Memory: one upcast copy of the logits plus one logsumexp temporary; no full log_softmax is kept.
    """
    if logits.dim() != 3 or ids.dim() != 3 or logits.shape[:2] != ids.shape[:2]:
        raise ValueError(f"gather_logps wants logits (N,T,V) and ids (N,T,K); got {tuple(logits.shape)}, "
                         f"{tuple(ids.shape)}")
    shifted = upcast(logits[:, :-1])
    out = shifted.gather(-1, ids[:, 1:]) - torch.logsumexp(shifted, dim=-1, keepdim=True)
    return F.pad(out, (0, 0, 1, 0))


def token_logps_from_logits(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(x_t | x_<t) for every position: logits (N,T,V), input_ids (N,T) -> (N,T); position 0 is 0."""
    if input_ids.dim() != 2:
        raise ValueError(f"token_logps_from_logits wants input_ids (N,T); got {tuple(input_ids.shape)}")
    return gather_logps(logits, input_ids.unsqueeze(-1)).squeeze(-1)


def topk_logps_from_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k next-token log-probs at each position: (N,T,V) -> values (N,T,k), ids (N,T,k) long.

    Position t holds the distribution predicting x_t (from logits[:, t-1]); position 0 is zeros / id 0.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"topk_logps_from_logits: k={k} must be in [1, vocab size {logits.shape[-1]}]")
    shifted = upcast(logits[:, :-1])
    values, ids = shifted.topk(k, dim=-1)
    values = values - torch.logsumexp(shifted, dim=-1, keepdim=True)
    return F.pad(values, (0, 0, 1, 0)), F.pad(ids, (0, 0, 1, 0))


def log_sq_mass(logits: Tensor) -> Tensor:
    """log Σ_v p(v)² of p = softmax(logits) over the last axis, (…,V) -> (…), without gradient: the
    log-probability that two independent draws from p agree (WPO's weight alignment). Computed as
    logsumexp(2z) − 2·logsumexp(z), in float32 at least; at most log 1 = 0, at least −log V."""
    with torch.no_grad():
        z = upcast(logits.detach())
        return torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)


def response_logps(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(token_logps (N,T), seq_logps (N,)) of the response tokens from float32 logits (N,T,V):
    position t from logits[t-1], position 0 is 0, zero outside the response mask."""
    token_logps = token_logps_from_logits(logits, input_ids) * response_mask
    return token_logps, token_logps.sum(-1)


def sq_mass_at_response(logits: Tensor, mask: Tensor) -> Tensor:
    """(N,T): log Σ_v p(v|x_<t)² at position t (from logits[t-1]; position 0 is 0), zero outside the mask."""
    return F.pad(log_sq_mass(logits[:, :-1]), (1, 0)) * mask


def topk_at_response(logits: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k next-token log-probs (values, ids), zeroed outside the response mask."""
    values, ids = topk_logps_from_logits(logits, k)
    keep = mask.unsqueeze(-1)
    return values * keep, (ids * keep.long())


def logps_at(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """(N,T,K): the log-probs at ``ids`` (N,T,K) (position t from logits[t-1]), zero outside the mask."""
    return gather_logps(logits, ids) * mask.unsqueeze(-1)


def entropy_at_response(logits: Tensor, mask: Tensor) -> Tensor:
    """(N,T): the entropy of p(·|x_<t) at position t (from logits[t-1]; position 0 is 0), no gradient,
    zero outside the mask."""
    with torch.no_grad():
        logp = logits[:, :-1].log_softmax(-1)
        return F.pad(-(logp.exp() * logp).sum(-1), (1, 0)) * mask


@dataclass
class Logits:
    """A forward's full logits (N,T,V) (any float dtype; scored in float32): what ``head.PlainHead``
    hands ``fields``, the plain counterpart of ``lean.HeadInput``."""

    logits: Tensor

    def fields(self, input_ids: Tensor, mask: Tensor, *, topk: int = 0, ids: Tensor | None = None,
               entropy: bool = False, sq_mass: bool = False, logit_mean: bool = False) -> dict[str, Tensor]:
        """The keys of ``lean.chunked_logps``: token_logps (N,T) and seq_logps (N,) (with gradients when
        the logits have them), with ``topk`` topk_logps / topk_ids (N,T,K) (no gradient on the ids),
        with ``ids`` (N,T,K') logps_at (N,T,K'), with ``entropy`` entropy (N,T), with ``sq_mass``
        log_sq_mass (N,T) (both without gradient); all zero outside ``mask``. Only here, where the full
        logits exist: with ``logit_mean`` logit_mean (N,T), the mean logit over the vocabulary that
        predicts position t (TRL's ``logits/*`` metrics), no gradient, zero outside ``mask``."""
        logits = self.logits.float()
        token_logps, seq_logps = response_logps(logits, input_ids, mask)
        out = {"token_logps": token_logps, "seq_logps": seq_logps}
        if ids is not None:
            out["logps_at"] = logps_at(logits, ids, mask)
        if topk:
            out["topk_logps"], out["topk_ids"] = topk_at_response(logits, mask, topk)
        if entropy:
            out["entropy"] = entropy_at_response(logits, mask)
        if sq_mass:
            out["log_sq_mass"] = sq_mass_at_response(logits, mask)
        if logit_mean:
            out["logit_mean"] = F.pad(logits.detach()[:, :-1].mean(-1), (1, 0)) * mask
        return out
