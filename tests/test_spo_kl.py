"""SPO's KL estimators (sparsepo.losses.kl) against the dense full-vocabulary KL, and SPO's
preference term at its limits. Pure tensor tests, float64."""

import dataclasses
import math

import pytest
import torch

from sparsepo.losses import LossInputs, SPOParams, spo_loss
from sparsepo.losses.kl import (EMPTY_BIN, importance_ratio, k1, k3, mask_support, token_kl, topk_tail_kl,
                                union_support)

pytestmark = pytest.mark.unit
F64 = torch.float64
V = 50


def dists(n: int, seed: int, *, sharp: float = 2.0):
    """n pairs of random next-token distributions over V ids (log-probs), the policy peaked where the
    reference is not (so the reference's top-K misses policy mass)."""
    g = torch.Generator().manual_seed(seed)
    p = (sharp * torch.randn(n, V, generator=g, dtype=F64)).log_softmax(-1)
    q = (sharp * torch.randn(n, V, generator=g, dtype=F64)).log_softmax(-1)
    return p, q


def dense_kl(p, q):
    return (p.exp() * (p - q)).sum(-1)


def support_logps(p, q, k, union):
    ids, keep = union_support(p.topk(k, -1).indices, q.topk(k, -1).indices if union else None)
    return mask_support(p.gather(-1, ids), keep), mask_support(q.gather(-1, ids), keep)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_tail_is_a_lower_bound_and_union_is_tighter(k):
    p, q = dists(400, seed=k)
    dense = dense_kl(p, q)
    policy_only = topk_tail_kl(*support_logps(p, q, k, union=False))
    union = topk_tail_kl(*support_logps(p, q, k, union=True))
    assert (policy_only <= dense + 1e-10).all() and (union <= dense + 1e-10).all()
    assert (union >= policy_only - 1e-10).all()  # a finer partition can only raise the coarsened KL
    assert (policy_only >= -1e-12).all()


def test_topk_tail_is_exact_when_k_is_the_vocabulary():
    p, q = dists(100, seed=1)
    assert torch.allclose(topk_tail_kl(*support_logps(p, q, V, union=False)), dense_kl(p, q), atol=1e-10)
    assert torch.allclose(topk_tail_kl(*support_logps(p, q, V, union=True)), dense_kl(p, q), atol=1e-10)


def test_policy_support_sees_mass_the_reference_top_k_misses():
    """Policy: 0.9 on id 7, where the reference has 1e-4; the reference's top-4 never holds id 7, so
    bins from the reference's top-K lump id 7 into the tail and see far less of the KL."""
    q = torch.full((V,), 1.0, dtype=F64)
    q[7] = 1e-4 * (V - 1) / (1 - 1e-4)
    q = (q / q.sum()).log()
    p = torch.full((V,), 0.1 / (V - 1), dtype=F64)
    p[7] = 0.9
    p = p.log()
    dense = dense_kl(p, q).item()
    ref_ids = q.topk(4).indices
    from_reference = topk_tail_kl(p[ref_ids], q[ref_ids]).item()
    from_policy = topk_tail_kl(*support_logps(p[None], q[None], 4, union=False)).item()
    assert from_policy > 0.95 * dense and from_reference < 0.1 * dense, (from_policy, from_reference, dense)


def test_union_drops_duplicate_ids():
    ids, keep = union_support(torch.tensor([[3, 1]]), torch.tensor([[1, 5]]))
    assert ids.tolist() == [[3, 1, 1, 5]] and keep.tolist() == [[True, True, False, True]]
    logps = mask_support(torch.zeros(1, 4, dtype=F64), keep)
    assert logps[0, 2].item() == EMPTY_BIN


@pytest.mark.parametrize("name,fn", [("k1", k1), ("k3", k3)])
def test_sampled_estimators_are_unbiased(name, fn):
    """Mean over N = 200 000 draws y ~ p of k(y) vs the dense KL, within 5 standard errors."""
    p, q = dists(3, seed=5, sharp=1.0)
    g = torch.Generator().manual_seed(11)
    for row in range(3):
        y = torch.multinomial(p[row].exp(), 200_000, replacement=True, generator=g)
        values = fn(p[row][y], q[row][y])
        stderr = values.std().item() / math.sqrt(len(y))
        assert abs(values.mean().item() - dense_kl(p[row], q[row]).item()) < 5 * stderr, (name, row, stderr)
    if name == "k3":
        assert (values >= 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_score_function_gradient_is_exact_in_expectation(estimator):
    """E_{y~πθ}[∇ surrogate(y)] = Σ_y sg(πθ(y))·∇ surrogate(y), summed exactly over the vocabulary,
    equals ∇ KL(πθ ‖ πref); the pathwise gradient of k3 equals ∇ KL(πref ‖ πθ) instead."""
    logits = torch.randn(V, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    q = torch.randn(V, dtype=F64, generator=torch.Generator().manual_seed(3)).log_softmax(-1)

    def expected_grad(gradient):
        p = logits.log_softmax(-1)
        per_token = token_kl(estimator, policy_support_logps=p[None], ref_support_logps=q[None],
                             policy_token_logps=p, ref_token_logps=q, gradient=gradient)
        return torch.autograd.grad((p.exp().detach() * per_token).sum(), logits)[0]

    p = logits.log_softmax(-1)
    forward = torch.autograd.grad(dense_kl(p, q), logits)[0]
    assert torch.allclose(expected_grad("score_function"), forward, atol=1e-12)
    if estimator == "k3":
        reverse = torch.autograd.grad((q.exp() * (q - logits.log_softmax(-1))).sum(), logits)[0]
        assert torch.allclose(expected_grad("pathwise"), reverse, atol=1e-12)
    else:
        assert torch.allclose(expected_grad("pathwise"), torch.zeros(V, dtype=F64), atol=1e-12)


def _spo_inputs(pw, pl):
    p, q = dists(2, seed=0)
    tok = torch.tensor([3, 4])
    return LossInputs(policy_chosen_logps=torch.tensor(pw, dtype=F64), policy_rejected_logps=torch.tensor(pl, dtype=F64),
                      chosen_mask=torch.ones(len(pw), 2, dtype=F64), rejected_mask=torch.ones(len(pw), 2, dtype=F64),
                      sample_mask=torch.ones(1, 2, dtype=F64), policy_sample_topk_logps=p[None, :, :8],
                      ref_sample_topk_logps=q[None, :, :8], policy_sample_token_logps=p[None, [0, 1], tok],
                      ref_sample_token_logps=q[None, [0, 1], tok])


def test_preference_term_is_log2_at_equal_logps_and_hard_at_large_alpha():
    """β=0: equal log-probs -> log 2 for any α; margin m = ±1.5 with α = 200: loss/α -> max(0, −m)
    (the hinge of a hard preference), i.e. 0 for a won pair and 1.5 for a lost one."""
    out = spo_loss(_spo_inputs([-4.0, -7.0], [-4.0, -7.0]), SPOParams(alpha=3.0, beta=0.0))
    assert torch.allclose(out.losses, torch.full((2,), math.log(2), dtype=F64), atol=1e-12)
    hard = spo_loss(_spo_inputs([-3.0, -6.0], [-4.5, -4.5]), SPOParams(alpha=200.0, beta=0.0))
    assert hard.losses[0].item() < 1e-100
    assert hard.losses[1].item() / 200.0 == pytest.approx(1.5, abs=1e-9)


@pytest.mark.parametrize("estimator", ["topk_tail", "k1", "k3"])
def test_kl_term_is_beta_times_estimate_on_every_pair(estimator):
    inputs = _spo_inputs([-3.0, -6.0], [-4.5, -4.5])
    base = spo_loss(inputs, SPOParams(beta=0.0, kl_estimator=estimator))
    out = spo_loss(inputs, SPOParams(beta=0.25, kl_estimator=estimator))
    kl = out.metrics["sample_kl"]
    assert torch.allclose(out.losses - base.losses, 0.25 * kl.expand(2), atol=1e-12)
    assert out.metrics["kl_term"].item() == pytest.approx(0.25 * kl.item(), abs=1e-12)
    assert out.metrics["preference_loss"].item() == pytest.approx(base.losses.mean().item(), abs=1e-12)


@pytest.mark.parametrize("name,fn", [("k1", k1), ("k3", k3)])
def test_stale_draws_weighted_by_the_ratio_are_unbiased(name, fn):
    """y ~ π_old (not πθ): the plain mean of k(y) misses the dense KL(πθ‖πref); weighted by
    ρ = πθ(y)/π_old(y) (`importance_ratio`, no cap reached) it is within 5 standard errors of it."""
    p, q = dists(3, seed=5, sharp=1.0)
    old = (0.5 * p + 0.5 * torch.randn(3, V, dtype=F64, generator=torch.Generator().manual_seed(8))).log_softmax(-1)
    g = torch.Generator().manual_seed(12)
    for row in range(3):
        y = torch.multinomial(old[row].exp(), 200_000, replacement=True, generator=g)
        rho = importance_ratio(p[row][y], old[row][y], float("inf"))
        values = token_kl(name, policy_support_logps=p[None], ref_support_logps=q[None], policy_token_logps=p[row][y],
                          ref_token_logps=q[row][y], ratio=rho)
        stderr = values.std().item() / math.sqrt(len(y))
        dense = dense_kl(p[row], q[row]).item()
        assert abs(values.mean().item() - dense) < 5 * stderr, (name, row, stderr)
        assert abs(fn(p[row][y], q[row][y]).mean().item() - dense) > 5 * stderr  # without the ratio: biased


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ratio_weighted_score_function_gradient_is_exact_under_the_old_policy(estimator):
    """Σ_y π_old(y)·∇[ρ(y)·surrogate(y)], summed exactly over the vocabulary, equals ∇KL(πθ ‖ πref)."""
    logits = torch.randn(V, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    q = torch.randn(V, dtype=F64, generator=torch.Generator().manual_seed(3)).log_softmax(-1)
    old = torch.randn(V, dtype=F64, generator=torch.Generator().manual_seed(4)).log_softmax(-1)
    p = logits.log_softmax(-1)
    per_token = token_kl(estimator, policy_support_logps=p[None], ref_support_logps=q[None], policy_token_logps=p,
                         ref_token_logps=q, ratio=importance_ratio(p, old, float("inf")))
    got = torch.autograd.grad((old.exp() * per_token).sum(), logits)[0]
    want = torch.autograd.grad(dense_kl(logits.log_softmax(-1), q), logits)[0]
    assert torch.allclose(got, want, atol=1e-12)


def _stale_inputs(old):
    base = _spo_inputs([-3.0, -6.0], [-4.5, -4.5])
    return dataclasses.replace(base, old_sample_token_logps=old)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_spo_weights_a_stale_round_by_the_capped_ratio(estimator):
    """The policy's own log-probs as π_old give ratio 1: the loss of fresh samples bit for bit. π_old
    log-probs lower by (log 2, log 8) give ratios (2, 8): the KL is Σ_t ρ_t·KL_t with ρ capped at is_clip=5
    → (2, 5), one token of two capped; topk_tail ignores the ratio."""
    fresh = _spo_inputs([-3.0, -6.0], [-4.5, -4.5])
    pol = fresh.policy_sample_token_logps
    params = SPOParams(beta=0.5, kl_estimator=estimator)
    same = spo_loss(_stale_inputs(pol.clone()), params)
    assert torch.equal(same.losses, spo_loss(fresh, params).losses)
    assert same.metrics["sample_is_ratio"].item() == 1.0 and same.metrics["sample_is_clipped"].item() == 0.0
    per_token = token_kl(estimator, policy_support_logps=fresh.policy_sample_topk_logps,
                         ref_support_logps=fresh.ref_sample_topk_logps, policy_token_logps=pol,
                         ref_token_logps=fresh.ref_sample_token_logps)
    old = pol - torch.tensor([[math.log(2), math.log(8)]], dtype=F64)
    out = spo_loss(_stale_inputs(old), params)
    want = 2.0 * per_token[0, 0] + 5.0 * per_token[0, 1]
    assert out.metrics["sample_kl"].item() == pytest.approx(want.item(), abs=1e-12)
    assert out.metrics["sample_is_ratio"].item() == pytest.approx(5.0, abs=1e-12)  # mean of (2, 8) before the cap
    assert out.metrics["sample_is_clipped"].item() == 0.5
    tail = SPOParams(beta=0.5, kl_estimator="topk_tail")
    assert torch.equal(spo_loss(_stale_inputs(old), tail).losses, spo_loss(fresh, tail).losses)
    with pytest.raises(ValueError, match="is_clip must be >= 1"):
        SPOParams(is_clip=0.5)
