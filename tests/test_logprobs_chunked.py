"""The lean head's own backward (sparsepo.logprobs.chunked.HeadLogps) against autograd through the
plain computation log_softmax(softcap(h Wᵀ + b)) gathered at the ids: gradients of h, W and b, with
and without soft-capping and bias, frozen weight, no rows at all, the no-gradient fields that ride along, bf16.
(No float64 gradcheck: the head computes in float32 whatever the input dtype, as the model's does.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from sparsepo.logprobs.chunked import HeadLogps
from sparsepo.logprobs.lean import chunk_stats, soft_cap

pytestmark = pytest.mark.unit
M, H, V, K = 11, 6, 13, 2


def inputs(dtype=torch.float32, bias=True, rows=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, H, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.3).requires_grad_() if bias else None
    at = torch.randint(0, V, (rows, 1 + K), generator=g)
    weights = torch.randn(rows, 1 + K, generator=g, dtype=torch.float64)
    return h, w, b, at, weights


def by_autograd(h, w, b, at, cap):
    logits = soft_cap(F.linear(h, w, b), cap).float()
    return (logits - torch.logsumexp(logits, -1, keepdim=True)).gather(-1, at)


def by_function(h, w, b, at, cap, chunk, **asks):
    stats = functools.partial(chunk_stats, topk=asks.get("topk", 0), entropy=asks.get("entropy", False),
                              sq_mass=False)
    logits_fn = lambda x: soft_cap(F.linear(x, w, b), cap)  # noqa: E731
    return HeadLogps.apply(h, w, b, at, chunk, cap, logits_fn, stats)


def grads(out, weights, *tensors):
    (out.double() * weights).sum().backward()
    got = [None if t is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return got


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_values_and_gradients_equal_autograd(cap, bias, chunk):
    h, w, b, at, weights = inputs(bias=bias)
    want = by_autograd(h, w, b, at, cap)
    want_grads = grads(want, weights, h, w, b)
    got = by_function(h, w, b, at, cap, chunk)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for name, g, wg in zip("hwb", grads(got, weights, h, w, b), want_grads):
        if wg is None:
            assert g is None
        else:
            assert wg.abs().sum() > 0
            torch.testing.assert_close(g, wg, atol=1e-5, rtol=1e-5, msg=name)


def test_a_frozen_weight_gets_no_gradient_and_h_still_does():
    h, w, b, at, weights = inputs()
    w.requires_grad_(False)
    b.requires_grad_(False)
    want = grads(by_autograd(h, w, b, at, None), weights, h)[0]
    got = grads(by_function(h, w, b, at, None, 4)[0], weights, h)[0]
    assert w.grad is None and b.grad is None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_no_rows_give_zero_weight_gradient_not_none():
    """A rank without response tokens still joins the backward (multi-rank ZeRO-3) and its weight
    gradient is zeros."""
    h, w, b, at, weights = inputs(rows=0)
    out = by_function(h, w, b, at, None, 4)[0]
    assert out.shape == (0, 1 + K)
    grads(out, weights, h, w, b)
    out = by_function(h, w, b, at, None, 4)[0]
    (out.sum() + 0.0).backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0


def test_the_stats_ride_along_without_gradient():
    h, w, b, at, _ = inputs()
    logps, topk, top_ids, entropy = by_function(h, w, b, at, None, 4, topk=3, entropy=True)
    logits = F.linear(h, w, b).detach()
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(topk, logp.topk(3, -1).values, atol=1e-6, rtol=0)
    assert torch.equal(top_ids, logits.topk(3, -1).indices)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), atol=1e-6, rtol=0)
    assert logps.requires_grad and not topk.requires_grad and not entropy.requires_grad


def test_bf16_gradients_stay_near_the_float32_ones():
    h, w, b, at, weights = inputs()
    want = grads(by_autograd(h, w, b, at, 3.0), weights, h, w, b)
    hb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in (h, w, b))
    got = grads(by_function(hb, wb, bb, at, 3.0, 4)[0], weights, hb, wb, bb)
    for g, wg in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert (g.float() - wg).abs().max() <= 0.05 * max(1.0, float(wg.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cap", [None, 30.0])
def test_on_cuda_in_bf16_values_and_gradients_stay_near_float32_autograd(cap):
    """The Function where a GPU run uses it: bf16 on CUDA against float32 autograd on the CPU."""
    h, w, b, at, weights = inputs()
    want_out = by_autograd(h, w, b, at, cap)
    want = grads(want_out, weights, h, w, b)
    hc, wc, bc = (t.detach().cuda().bfloat16().requires_grad_() for t in (h, w, b))
    got_out = by_function(hc, wc, bc, at.cuda(), cap, 4)[0]
    assert (got_out.cpu() - want_out.detach()).abs().max() <= 0.05
    for g, wg in zip(grads(got_out, weights.cuda(), hc, wc, bc), want):
        assert g.is_cuda and g.dtype == torch.bfloat16
        assert (g.float().cpu() - wg).abs().max() <= 0.05 * max(1.0, float(wg.abs().max()))
