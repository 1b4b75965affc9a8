"""The lean head's loop: log_softmax(head(h)) at given ids, ``chunk`` rows of logits at a time, with
its own backward (``HeadLogps``).

Forward: per chunk, the logits (C,V) in float32, their logsumexp (C,1) and the log-probs at the
asked ids (C,1+K'); only the logsumexp is kept. Backward: per chunk, the logits again from the same
h and weight, softmax p = exp(logits - lse), and with g the incoming gradient (C,1+K')

    d logits = scatter_add(at, g) - p * sum(g)        (then the soft cap's tanh' where the family has one)
    grad h += d logits @ W,   grad W += d logitsᵀ @ h,   grad b += sum of d logits

so a chunk costs three matmuls and no autograd graph: before this the backward replayed each chunk
under ``torch.utils.checkpoint`` (the forward's graph rebuilt, the gather's backward a (C,V) scatter,
per-chunk saved-tensor hooks). This Function is where a fused GPU kernel (a Liger-style linear +
log-softmax) plugs in: same inputs, same outputs, the loop here the reference implementation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def head_logps(logits_fn: Callable[[Tensor], Tensor], h: Tensor, at: Tensor, chunk: int,
               stats: Callable[[Tensor, Tensor], list]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """h (M,H), at (M,1+K') ids -> (logps (M,1+K') float32, lse (M,1) float32, the ``stats`` of each
    chunk's (logits, lse) concatenated). At least one (possibly empty) chunk runs."""
    logps, lse, extra = [], [], []
    for lo in range(0, max(int(h.shape[0]), 1), chunk):
        logits = logits_fn(h[lo:lo + chunk]).float()  # (C,V)
        z = torch.logsumexp(logits, dim=-1, keepdim=True)
        logps.append(logits.gather(-1, at[lo:lo + chunk]) - z)
        lse.append(z)
        extra.append(stats(logits, z))
    return torch.cat(logps), torch.cat(lse), [torch.cat(field) for field in zip(*extra)]


class HeadLogps(torch.autograd.Function):
    """``head_logps`` with gradients to h, the head's weight and bias (module docstring)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, at: Tensor, chunk: int,
                softcap: float | None, logits_fn, stats) -> tuple[Tensor, ...]:
        logps, lse, extra = head_logps(logits_fn, h, at, chunk, stats)
        ctx.save_for_backward(h, weight, bias, at, lse)
        ctx.chunk, ctx.softcap = chunk, softcap
        ctx.mark_non_differentiable(*extra)
        return (logps, *extra)

    @staticmethod
    def backward(ctx, grad: Tensor, *_):
        h, weight, bias, at, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if need_h else None
        # accumulated over chunks in the weight's dtype, as autograd accumulates a parameter's gradient:
        # no float32 copy of a (V,H) head (2 GB at vocabulary 128k, hidden 4096)
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for lo in range(0, int(h.shape[0]), ctx.chunk):
            hc, g = h[lo:lo + ctx.chunk], grad[lo:lo + ctx.chunk].float()
            z = F.linear(hc, weight, bias)  # (C,V) in the model dtype, as the forward's
            capped = z if ctx.softcap is None else torch.tanh(z / ctx.softcap) * ctx.softcap
            d = torch.exp(capped.float() - lse[lo:lo + ctx.chunk]).mul_(-g.sum(-1, keepdim=True))
            d.scatter_add_(-1, at[lo:lo + ctx.chunk], g)
            if ctx.softcap is not None:  # d/dz tanh(z/c)·c = 1 - tanh(z/c)²
                d.mul_(1 - (capped.float() / ctx.softcap) ** 2)
            d = d.to(z.dtype)
            if need_h:
                grad_h[lo:lo + ctx.chunk] = d @ weight
            if need_w:
                grad_w.addmm_(d.t(), hc)
            if need_b:
                grad_b.add_(d.sum(0))
        return grad_h, grad_w, grad_b, None, None, None, None, None
