"""Log-probs from the last hidden state, chunk by chunk over the response positions: the lean path.

The plain path (``model(...).logits``, then ``losses.common``) holds (N,T,V) float32 logits — at
vocabulary 128k and T 2k the largest tensor of a training step, several times over at its peak
(docs/benchmarks.md, "Lean log-probs"). Here the model's forward runs with ``logits_to_keep=1``
(the head sees one position per row), a hook on the family's final norm (``reference.families``:
the head's input) keeps the last hidden state (N,T,H), and the head — the model's own
``lm_head`` plus the family's soft-capping, through ``reference.stages.HeadStage``, the module the
live pipeline's last stage uses — runs on ``chunk`` response positions at a time, each chunk's
log_softmax in float32. Prompt and padding positions never see the head. With gradients each chunk
is checkpointed, so the backward recomputes one chunk's logits at a time and never holds them all.

Alignment as ``losses.common``: the value at position t describes x_t and comes from hidden[t-1].
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsepo.losses.common import log_sq_mass
from sparsepo.reference.families import FAMILIES
from sparsepo.reference.stages import HeadStage, get_module

DEFAULT_CHUNK = 128
"""Response positions per head chunk (``model.logits_chunk``); see docs/benchmarks.md for the choice."""


@dataclass
class HeadInput:
    """The last hidden state of N rows and the head that turns it into logits: what ``score`` and
    ``pair_forward`` take instead of (N,T,V) logits on the lean path."""

    hidden: Tensor  # (N,T,H) the head's input (after the final norm)
    head: nn.Module  # (…,H) -> (…,V) logits in the model dtype, soft-capped as the model's forward does
    chunk: int = DEFAULT_CHUNK


def _unwrap(model):
    """The Hugging Face model inside a ``PolicyEngine`` / ``DeepSpeedEngine`` (or the model itself)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def lean_head(model) -> tuple[nn.Module, nn.Module] | None:
    """(final norm, head) of a causal LM whose family the table knows and whose forward takes
    ``logits_to_keep``; None otherwise (the caller keeps the plain path)."""
    module = _unwrap(model)
    config = getattr(module, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or "logits_to_keep" not in inspect.signature(module.forward).parameters:
        return None
    try:
        norm, lm_head = get_module(module, family.norm), get_module(module, family.head)
    except (AttributeError, IndexError):
        return None
    softcap = getattr(config, "final_logit_softcapping", None) if family.logit_softcap else None
    return norm, HeadStage(nn.Identity(), lm_head, softcap)


@contextmanager
def _capture_output(module: nn.Module):
    got: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield got
    finally:
        handle.remove()


def hidden_forward(model, input_ids: Tensor, attention_mask: Tensor, chunk: int) -> HeadInput | None:
    """Run ``model`` (a ``PolicyEngine`` or an HF model: called as given, so DeepSpeed's hooks run) for
    the head's input only. None when the model has no lean head (``lean_head``)."""
    found = lean_head(model)
    if found is None:
        return None
    norm, head = found
    with _capture_output(norm) as got:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    if len(got) != 1:
        raise RuntimeError(f"lean log-probs: the final norm ran {len(got)} times in one forward (expected once)")
    return HeadInput(hidden=got[0], head=head, chunk=chunk)


def _chunk_fn(head: nn.Module, topk: int, entropy: bool, sq_mass: bool = False):
    def fn(h: Tensor, targets: Tensor, ids: Tensor | None):
        logits = head(h).float()  # (C,V)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out = [(logits.gather(-1, targets[:, None]) - lse).squeeze(-1)]
        out.append(logits.gather(-1, ids) - lse if ids is not None else None)
        if topk:
            values, top_ids = logits.detach().topk(topk, dim=-1)
            out += [values - lse.detach(), top_ids]
        else:
            out += [None, None]
        if entropy:
            with torch.no_grad():
                logp = logits - lse
                out.append(-(logp.exp() * logp).sum(-1))
        else:
            out.append(None)
        out.append(log_sq_mass(logits) if sq_mass else None)
        return tuple(out)
    return fn


def chunked_logps(src: HeadInput, input_ids: Tensor, mask: Tensor, *, topk: int = 0, ids: Tensor | None = None,
                  entropy: bool = False, sq_mass: bool = False) -> dict[str, Tensor]:
    """The plain path's fields from the hidden state, ``src.chunk`` response positions at a time.

    input_ids (N,T), mask (N,T) 0/1 (never 1 at t=0). Returns token_logps (N,T) (zero outside the
    mask) and seq_logps (N,) — with gradients when the hidden state has them —, with ``topk``
    topk_logps (N,T,K) and topk_ids (N,T,K) long (no gradient; zero outside the mask), with ``ids``
    (N,T,K') logps_at (N,T,K') (the log-probs at those ids, with gradients, zero outside the mask),
    with ``entropy`` entropy (N,T) (no gradient), with ``sq_mass`` log_sq_mass (N,T) (log Σ_v p(v)², no
    gradient; ``losses.common.log_sq_mass``). Equal to ``losses.common`` on the full logits."""
    hidden = src.hidden
    n, t = input_ids.shape
    if src.chunk < 1:
        raise ValueError(f"chunked_logps: chunk={src.chunk} must be >= 1")
    where = (mask[:, 1:] != 0).reshape(-1).nonzero().squeeze(-1)  # flat (n, t-1) of each response token's predictor
    width = max(t - 1, 1)
    pred = (where // width) * t + where % width  # the predicting position in (N*T)
    target = pred + 1
    h = hidden.reshape(n * t, -1)
    grad = torch.is_grad_enabled() and h.requires_grad
    fn = _chunk_fn(src.head, topk, entropy, sq_mass)
    flat_ids = ids.reshape(n * t, -1) if ids is not None else None
    parts: list[tuple] = []
    for lo in range(0, int(where.numel()), src.chunk):
        p, q = pred[lo:lo + src.chunk], target[lo:lo + src.chunk]
        args = (h[p], input_ids.reshape(-1)[q], flat_ids[q] if flat_ids is not None else None)
        parts.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))

    def place(i: int, shape: tuple, dtype) -> Tensor:
        flat = torch.zeros((n * t, *shape), dtype=dtype, device=hidden.device)
        if parts:
            flat = flat.index_put((target,), torch.cat([part[i] for part in parts]))
        return flat.reshape(n, t, *shape)

    token_logps = place(0, (), torch.float32)
    got = {"token_logps": token_logps, "seq_logps": token_logps.sum(-1)}
    if ids is not None:
        got["logps_at"] = place(1, (ids.shape[-1],), torch.float32)
    if topk:
        got["topk_logps"], got["topk_ids"] = place(2, (topk,), torch.float32), place(3, (topk,), torch.long)
    if entropy:
        got["entropy"] = place(4, (), torch.float32)
    if sq_mass:
        got["log_sq_mass"] = place(5, (), torch.float32)
    return got
