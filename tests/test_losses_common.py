"""Shared loss pieces: alignment of log-probs, masking, sparse KL, FPO's union MSE, SePO's selection.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses_common.py -q
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsepo.losses import (
    gather_logps,
    masked_mean,
    masked_sum,
    pool_over_mask,
    pooled_union_mse,
    response_lengths,
    select_tokens,
    sparse_kl,
    token_logps_from_logits,
    topk_logps_from_logits,
)

LN2 = math.log(2.0)


def full_kl(p_logps, q_logps):
    return (p_logps.exp() * (p_logps - q_logps)).sum(-1)


# --------------------------------------------------------------------------------------------
# alignment


def test_token_logps_match_a_hand_loop():
    """token_logps[n, t] = log softmax(logits[n, t-1])[x_t]; position 0 is 0. Exact to 1e-12 in float64."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    got = token_logps_from_logits(logits, ids)
    assert got.shape == (2, 5)
    for n in range(2):
        assert got[n, 0].item() == 0.0
        for t in range(1, 5):
            row = logits[n, t - 1]
            expected = row[ids[n, t]].item() - math.log(sum(math.exp(v) for v in row.tolist()))
            assert got[n, t].item() == pytest.approx(expected, abs=1e-12)


def test_token_logps_upcast_half_precision():
    logits = torch.randn(1, 4, 9).to(torch.bfloat16)
    ids = torch.randint(0, 9, (1, 4))
    got = token_logps_from_logits(logits, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, token_logps_from_logits(logits.float(), ids))


def test_topk_logps_are_aligned_and_sorted():
    """Position t holds the top-k of log_softmax(logits[:, t-1]); position 0 is zeros / id 0."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    values, ids = topk_logps_from_logits(logits, 3)
    assert values.shape == ids.shape == (2, 4, 3) and ids.dtype == torch.long
    assert torch.all(values[:, 0] == 0) and torch.all(ids[:, 0] == 0)
    full = torch.log_softmax(logits, -1)
    for t in range(1, 4):
        expected_values, expected_ids = full[:, t - 1].topk(3, dim=-1)
        torch.testing.assert_close(values[:, t], expected_values, rtol=0, atol=1e-12)
        assert torch.equal(ids[:, t], expected_ids)
    with pytest.raises(ValueError, match="k=7"):
        topk_logps_from_logits(logits, 7)


def test_gather_logps_matches_token_logps_and_topk():
    """One gather of [x_t, top-K ids] gives the token log-probs and the policy's log-probs at the ids."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, 8, (2, 5), generator=g)
    values, ids = topk_logps_from_logits(logits, 3)
    both = gather_logps(logits, torch.cat([input_ids.unsqueeze(-1), ids], dim=-1))
    torch.testing.assert_close(both[..., 0], token_logps_from_logits(logits, input_ids), rtol=0, atol=1e-12)
    torch.testing.assert_close(both[..., 1:], values, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# masking


def test_masked_sum_and_mean_ignore_masked_inf_and_handle_empty_rows():
    """Row 0: mask picks 1 and 3 -> sum 4, mean 2; the -inf under a 0 mask contributes 0.
    Row 1: empty mask -> sum 0, mean 0 (not nan)."""
    x = torch.tensor([[1.0, float("-inf"), 3.0], [5.0, 6.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert masked_sum(x, mask).tolist() == [4.0, 0.0]
    assert masked_mean(x, mask).tolist() == [2.0, 0.0]
    masked_mean(x, mask).sum().backward()
    assert x.grad.tolist() == [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]
    assert response_lengths(mask).tolist() == [2.0, 1.0]


def test_pool_over_mask_averages_response_positions():
    """x[0] rows are [1,2], [3,4], [5,6]; the mask keeps rows 1 and 2 -> [(3+5)/2, (4+6)/2] = [4, 5]."""
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    assert pool_over_mask(x, torch.tensor([[0.0, 1.0, 1.0]])).tolist() == [[4.0, 5.0]]
    assert pool_over_mask(x, torch.zeros(1, 3)).tolist() == [[0.0, 0.0]]


# --------------------------------------------------------------------------------------------
# sparse KL


def test_sparse_kl_by_hand():
    """p = (0.5, 0.25 | tail 0.25), q = (0.25, 0.25 | tail 0.5):
    KL(p‖q) = 0.5·ln(0.5/0.25) + 0.25·ln(1) + 0.25·ln(0.25/0.5) = 0.5 ln2 − 0.25 ln2 = 0.25 ln2 = 0.1732868.
    KL(q‖p) = 0.25·ln(0.5) + 0 + 0.5·ln(2) = 0.25 ln2 as well. Tolerance 1e-12 (float64)."""
    p = torch.tensor([0.5, 0.25], dtype=torch.float64).log()
    q = torch.tensor([0.25, 0.25], dtype=torch.float64).log()
    assert sparse_kl(p, q).item() == pytest.approx(0.25 * LN2, abs=1e-12)
    assert sparse_kl(q, p).item() == pytest.approx(0.25 * LN2, abs=1e-12)
    assert sparse_kl(p, p).item() == pytest.approx(0.0, abs=1e-15)


def test_sparse_kl_direction():
    """p = (0.5, 0.375 | tail 0.125), q = (0.25, 0.25 | tail 0.5):
    KL(p‖q) = 0.5·ln2 + 0.375·ln1.5 + 0.125·ln0.25 = 0.25 ln2 + 0.375 ln1.5 = 0.32533621;
    KL(q‖p) = 0.25·ln0.5 + 0.25·ln(2/3) + 0.5·ln4 = 0.75 ln2 − 0.25 ln1.5 = 0.41849411."""
    p = torch.tensor([0.5, 0.375], dtype=torch.float64).log()
    q = torch.tensor([0.25, 0.25], dtype=torch.float64).log()
    assert sparse_kl(p, q).item() == pytest.approx(0.32533621, abs=1e-8)
    assert sparse_kl(q, p).item() == pytest.approx(0.41849411, abs=1e-8)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sparse_kl_is_exact_when_k_is_the_vocabulary(dtype, tol):
    g = torch.Generator().manual_seed(3)
    p = torch.log_softmax(torch.randn(4, 6, 11, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(4, 6, 11, generator=g, dtype=torch.float64), -1)
    got = sparse_kl(p.to(dtype), q.to(dtype))
    torch.testing.assert_close(got.double(), full_kl(p, q), rtol=0, atol=tol)


def test_sparse_kl_is_a_lower_bound_below_full_vocabulary():
    """Data-processing inequality: coarsening onto K ids + tail never raises the KL, for any K < V."""
    g = torch.Generator().manual_seed(4)
    p = torch.log_softmax(2 * torch.randn(64, 12, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(2 * torch.randn(64, 12, generator=g, dtype=torch.float64), -1)
    exact = full_kl(p, q)
    previous = torch.zeros_like(exact)
    for k in range(1, 12):
        ids = p.topk(k, dim=-1).indices
        approx = sparse_kl(p.gather(-1, ids), q.gather(-1, ids))
        assert torch.all(approx <= exact + 1e-12)
        assert torch.all(approx >= -1e-12)
        assert torch.all(approx >= previous - 1e-12)  # refining the bins only adds information
        previous = approx
    torch.testing.assert_close(previous, exact, rtol=0, atol=1e-12)


def test_sparse_kl_is_finite_on_padding_and_peaked_distributions():
    """Position-0 padding (all zeros: Σ exp = K > 1) and a top-1 holding all the mass stay finite."""
    zeros = torch.zeros(3, 4)
    assert torch.isfinite(sparse_kl(zeros, zeros)).all()
    peaked = torch.tensor([[0.0, -200.0]])
    assert torch.isfinite(sparse_kl(peaked, torch.tensor([[-0.1, -3.0]]))).all()


def test_sparse_kl_gradcheck():
    g = torch.Generator().manual_seed(5)
    full = torch.log_softmax(torch.randn(3, 8, generator=g, dtype=torch.float64), -1)
    ids = full.topk(3, dim=-1).indices
    p = full.gather(-1, ids)
    q = torch.log_softmax(torch.randn(3, 8, generator=g, dtype=torch.float64), -1).gather(-1, ids)
    p.requires_grad_(True)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(sparse_kl, (p, q))


# --------------------------------------------------------------------------------------------
# FPO's pooled union MSE


def test_pooled_union_mse_by_hand():
    """c̄θ = [0, .3, .1, .4], k=2: topk(c̄θ) = {3, 1}; reference ids [1, 2] values [.5, .1]; I = {1, 2, 3}.
    (0.3−0.5)² + (0.1−0.1)² + (0.4−0)² = 0.04 + 0 + 0.16 = 0.20; / k=2 -> 0.10; |I| = 3."""
    mse, size = pooled_union_mse(torch.tensor([[0.0, 0.3, 0.1, 0.4]], dtype=torch.float64),
                                 torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.1]], dtype=torch.float64), 2)
    assert mse.item() == pytest.approx(0.10, abs=1e-12)
    assert size.tolist() == [3]


def test_pooled_union_mse_matches_a_dense_reference():
    g = torch.Generator().manual_seed(6)
    B, F, k = 6, 40, 5
    policy = torch.rand(B, F, generator=g, dtype=torch.float64)
    ref_dense = torch.rand(B, F, generator=g, dtype=torch.float64)
    ref_values, ref_ids = ref_dense.topk(k, dim=-1)
    mse, size = pooled_union_mse(policy, ref_ids, ref_values, k)
    for b in range(B):
        ref = dict(zip(ref_ids[b].tolist(), ref_values[b].tolist()))
        union = set(policy[b].topk(k).indices.tolist()) | set(ref)
        expected = sum((policy[b, i].item() - ref.get(i, 0.0)) ** 2 for i in union) / k
        assert mse[b].item() == pytest.approx(expected, abs=1e-12)
        assert size[b].item() == len(union)


# --------------------------------------------------------------------------------------------
# SePO's selection


CEIL_ALL = dict(rounding="ceil", min_tokens=1, skip_first_token=False)
FLOOR_ALL = dict(rounding="floor", min_tokens=0, skip_first_token=False)


def row(length: int, pad: int = 2) -> torch.Tensor:
    """A (1, length + pad) response mask: position 0 is the prompt, then `length` response tokens."""
    mask = torch.zeros(1, length + pad)
    mask[0, 1:1 + length] = 1
    return mask


def test_select_tokens_by_hand():
    """CEIL_ALL. Row 0: 5 response tokens, ρ=0.3 -> ceil(1.5) = 2; the largest scores among masked
    positions are 0.9 (t=2) and 0.5 (t=4). Row 1: 3 tokens -> ceil(0.9) = 1; the smallest masked
    score is −0.7 (t=2), not the −9 at masked-out t=4."""
    scores = torch.tensor([[0.0, 0.1, 0.9, -0.2, 0.5, 0.3], [0.0, 0.4, -0.7, 0.2, -9.0, -9.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1], [0.0, 1, 1, 1, 0, 0]])
    top = select_tokens(scores, mask, 0.3, largest=True, **CEIL_ALL)
    bottom = select_tokens(scores, mask, 0.3, largest=False, **CEIL_ALL)
    assert top[0].tolist() == [0, 0, 1, 0, 1, 0]
    assert bottom[1].tolist() == [0, 0, 1, 0, 0, 0]


def test_select_tokens_defaults_skip_the_first_token_and_floor():
    """Defaults (the authors' rule plus min_tokens=1). Row 0: the first response token t=1 holds the
    best score 5.0 but is never a candidate; candidates t=2..5 (N=4), floor(1.2) = 1 -> t=2 (0.9).
    Row 1: candidates t=2,3 (N=2), floor(0.6) = 0 -> min_tokens=1 -> the lowest, t=2 (−0.7)."""
    scores = torch.tensor([[0.0, 5.0, 0.9, -0.2, 0.5, 0.3], [0.0, -5.0, -0.7, 0.2, -9.0, -9.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1], [0.0, 1, 1, 1, 0, 0]])
    assert select_tokens(scores, mask, 0.3, largest=True)[0].tolist() == [0, 0, 1, 0, 0, 0]
    assert select_tokens(scores, mask, 0.3, largest=False)[1].tolist() == [0, 0, 1, 0, 0, 0]
    # ρ = 1 keeps every candidate: all response tokens but the first
    assert select_tokens(scores, mask, 1.0, largest=True)[0].tolist() == [0, 0, 1, 1, 1, 1]


def test_select_tokens_exclude_leaves_positions_out_of_the_candidates():
    """Row [., a, b, c, eos] with the eos scored lowest: by default the bottom floor(0.5·3) = 1 of t=2..4
    is the eos (t=4); excluding it leaves t=2,3 (N=2), floor(1.0) = 1: the lower of them, t=3."""
    scores = torch.tensor([[0.0, 0.5, 0.2, -0.1, -3.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 1]])
    eos = torch.tensor([[0.0, 0, 0, 0, 1]])
    assert select_tokens(scores, mask, 0.5, largest=False)[0].tolist() == [0, 0, 0, 0, 1]
    assert select_tokens(scores, mask, 0.5, largest=False, exclude=eos)[0].tolist() == [0, 0, 0, 1, 0]


def test_select_tokens_first_token_is_per_row_after_left_padding():
    """The first response token is the first masked position of each row, wherever it falls."""
    mask = torch.tensor([[0.0, 0, 0, 1, 1], [0.0, 1, 1, 1, 1]])
    scores = torch.tensor([[0.0, 0, 0, 9.0, 1.0], [0.0, 9.0, 3.0, 2.0, 1.0]])
    got = select_tokens(scores, mask, 1.0, largest=True)
    assert got.tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]


def test_select_tokens_ties_break_towards_the_earlier_position():
    """Equal scores: largest and smallest both take the earliest positions first."""
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 1]])
    assert select_tokens(scores, mask, 0.5, largest=True, **CEIL_ALL).tolist() == [[0, 1, 1, 0, 0]]
    assert select_tokens(scores, mask, 0.5, largest=False, **CEIL_ALL).tolist() == [[0, 1, 1, 0, 0]]
    # with a strict winner later on, the tie among the rest still goes to the earliest
    scores[0, 4] = 2.0
    assert select_tokens(scores, mask, 0.5, largest=True, **CEIL_ALL).tolist() == [[0, 1, 0, 0, 1]]


@pytest.mark.parametrize("length,rho,count", [(10, 0.3, 3), (1, 0.3, 1), (0, 0.3, 0), (7, 1.0, 7), (4, 0.5, 2),
                                              (11, 0.3, 4), (100, 0.07, 7), (25, 0.28, 7)])
def test_select_tokens_counts_ceil(length, rho, count):
    """ceil(ρ·|y|), at least one token, none for an empty response. In floating point
    100·0.07 = 7.000000000000001 and 25·0.28 = 7.000000000000001: both must still give 7, not 8."""
    mask = row(length)
    selected = select_tokens(torch.randn(1, length + 2), mask, rho, largest=True, **CEIL_ALL)
    assert selected.sum().item() == count
    assert torch.all(selected <= mask)


@pytest.mark.parametrize("length,rho,count", [(10, 0.3, 3), (11, 0.3, 3), (3, 0.3, 0), (1, 0.3, 0), (0, 0.3, 0),
                                              (7, 1.0, 7), (10, 0.7, 7), (100, 0.07, 7), (9, 1e-6, 0)])
def test_select_tokens_counts_floor(length, rho, count):
    """floor(ρ·|y|) with no minimum (the authors' int(ρ·N)): responses shorter than 1/ρ keep nothing;
    10·0.7 = 6.999999999999999 in floating point must still give 7, not 6."""
    mask = row(length)
    selected = select_tokens(torch.randn(1, length + 2), mask, rho, largest=False, **FLOOR_ALL)
    assert selected.sum().item() == count


@pytest.mark.parametrize("rounding,min_tokens,skip,length,count", [
    ("floor", 1, True, 3, 1),    # N=2: floor(0.6)=0 -> raised to 1
    ("floor", 0, True, 3, 0),    # the authors' rule: nothing
    ("floor", 1, True, 1, 0),    # N=0 after the first token: the minimum is capped at N
    ("ceil", 1, True, 8, 3),     # N=7: ceil(2.1) = 3
    ("floor", 1, True, 8, 2),    # N=7: floor(2.1) = 2 (the authors' 8-token minimum response)
    ("floor", 5, False, 3, 3),   # min_tokens above N: capped at N
])
def test_select_tokens_min_tokens_and_first_token(rounding, min_tokens, skip, length, count):
    mask = row(length)
    selected = select_tokens(torch.randn(1, length + 2), mask, 0.3, largest=True, rounding=rounding,
                             min_tokens=min_tokens, skip_first_token=skip)
    assert selected.sum().item() == count
    if skip and length:
        assert selected[0, 1] == 0


def test_select_tokens_tiny_rho_keeps_min_tokens():
    """ρ → 0: floor gives 0, raised to min_tokens; ceil of a tiny positive product is 1."""
    mask = row(50)
    scores = torch.arange(52.0).unsqueeze(0)
    assert select_tokens(scores, mask, 1e-9, largest=True, rounding="floor", min_tokens=2).tolist()[0][49:51] == [1, 1]
    assert select_tokens(scores, mask, 1e-3, largest=True, rounding="ceil", min_tokens=0).sum().item() == 1


@pytest.mark.parametrize("kwargs,word", [({"rho": 0.0}, "rho"), ({"rho": 1.01}, "rho"),
                                         ({"rounding": "round"}, "rounding"), ({"min_tokens": -1}, "min_tokens")])
def test_select_tokens_rejects_bad_settings(kwargs, word):
    args = {"rho": 0.3, **kwargs}
    with pytest.raises(ValueError, match=word):
        select_tokens(torch.zeros(1, 3), torch.ones(1, 3), largest=True, **args)


# --------------------------------------------------------------------------------------------
# isolation


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_import_leaves_heavy_packages_out():
    """`import sparsepo.losses` in a clean interpreter imports neither deepspeed, transformers nor sae_lens."""
    code = ("import sys, sparsepo.losses; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'transformers', 'sae_lens')); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout + done.stderr
