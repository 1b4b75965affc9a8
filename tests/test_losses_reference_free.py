"""CPO and ORPO (reference-free rows), and the knobs on existing rows: DPO's sft_weight (RPO) and
SimPO's gamma_beta_ratio. Hand-worked values, reductions and refusals.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses_reference_free.py -q

ℓ(z) = −log σ(z) = log(1 + e^{−z}).
"""

import math

import pytest
import torch

from loss_fields import F64, METHODS, TOL, inputs_for, random_fields, softplus_neg, t
from sparsepo.losses import (
    CPOParams,
    DPOParams,
    LossInputs,
    ORPOParams,
    SimPOParams,
    cpo_loss,
    dpo_loss,
    orpo_loss,
    simpo_loss,
)
from sparsepo.losses.orpo import log1mexp


def simpo_pair():
    """log πθ(yw) = −6 over |yw| = 3, log πθ(yl) = −12 over |yl| = 4 (test_simpo_by_hand's pair)."""
    return LossInputs(policy_chosen_logps=t([-6.0]), policy_rejected_logps=t([-12.0]),
                      chosen_mask=t([[0, 1, 1, 1, 0]]), rejected_mask=t([[0, 1, 1, 1, 1]]))


def test_quoted_constants():
    assert softplus_neg(0.6) == pytest.approx(0.43748795, abs=1e-8)
    assert math.log(-math.expm1(-2.0)) == pytest.approx(-0.14541346, abs=1e-8)
    assert math.log(-math.expm1(-3.0)) == pytest.approx(-0.05106918, abs=1e-8)
    assert softplus_neg(1.09434428) == pytest.approx(0.28875078, abs=1e-8)


def test_cpo_by_hand():
    """β=0.1, α=1: r(yw) = 0.1·(−6) = −0.6, r(yl) = 0.1·(−12) = −1.2, z = 0.6; ℓ(0.6) = 0.43748795;
    NLL = 6/3 = 2; loss = 2.43748795. α=0: 0.43748795."""
    out = cpo_loss(simpo_pair(), CPOParams(beta=0.1, cpo_alpha=1.0))
    assert out.losses.item() == pytest.approx(2.43748795, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-0.6, -1.2), abs=TOL)
    assert out.metrics["nll"].item() == pytest.approx(2.0, abs=TOL)
    assert cpo_loss(simpo_pair(), CPOParams(cpo_alpha=0.0)).losses.item() == pytest.approx(0.43748795, abs=1e-8)


def test_cpo_without_nll_is_dpo_against_a_uniform_reference():
    """L_prefer is DPO with log πref ≡ const: zero reference log-probs give the same numbers."""
    fields = random_fields(seed=30)
    cpo = cpo_loss(inputs_for(METHODS["cpo"], fields), CPOParams(beta=0.1, cpo_alpha=0.0))
    zeros = torch.zeros(2, dtype=F64)
    dpo = dpo_loss(inputs_for(METHODS["dpo"], fields, ref_chosen_logps=zeros, ref_rejected_logps=zeros),
                   DPOParams(beta=0.1))
    torch.testing.assert_close(cpo.losses, dpo.losses, rtol=0, atol=1e-15)


def test_orpo_by_hand():
    """λ=0.1. p̄(yw) = −6/3 = −2, p̄(yl) = −12/4 = −3.
    log odds(yw) = −2 − log(1 − e^{−2}) = −2 + 0.14541346 = −1.85458654;
    log odds(yl) = −3 − log(1 − e^{−3}) = −3 + 0.05106918 = −2.94893082; difference 1.09434428.
    loss = NLL + λ·ℓ(1.09434428) = 2 + 0.1·0.28875078 = 2.02887508. Rewards λ·p̄: −0.2, −0.3."""
    out = orpo_loss(simpo_pair(), ORPOParams(beta=0.1))
    assert out.losses.item() == pytest.approx(2.02887508, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-0.2, -0.3), abs=TOL)
    assert out.metrics["log_odds"].item() == pytest.approx(1.09434428, abs=1e-8)
    assert out.metrics["nll"].item() == pytest.approx(2.0, abs=TOL)


def test_log1mexp_is_stable_at_both_ends():
    """log(1 − e^x) to 1e-12 relative: near 0 against log(−expm1(x)) (log1p(−exp(x)) loses digits there:
    −1e-10 -> 8e-8 off), far out against log1p(−exp(x)) (log(−expm1(−50)) rounds to 0, losing −1.9e-22);
    finite at x = 0 (clamped to −eps)."""
    near = t([-0.5, -0.1, -1e-10])
    far = t([-50.0, -3.0, -0.7])
    torch.testing.assert_close(log1mexp(near), t([math.log(-math.expm1(v)) for v in near.tolist()]), rtol=1e-12, atol=0)
    torch.testing.assert_close(log1mexp(far), t([math.log1p(-math.exp(v)) for v in far.tolist()]), rtol=1e-12, atol=0)
    assert torch.isfinite(log1mexp(t([0.0]))).all()
    x32 = torch.tensor([-1e-3, -20.0])
    assert torch.isfinite(log1mexp(x32)).all()


def test_orpo_survives_an_empty_response():
    """An empty chosen mask gives p̄ = 0/1 = 0; the loss stays finite (log(1 − e^0) is clamped)."""
    inputs = LossInputs(policy_chosen_logps=t([0.0]), policy_rejected_logps=t([-4.0]),
                        chosen_mask=t([[0, 0, 0]]), rejected_mask=t([[0, 1, 1]]))
    assert torch.isfinite(orpo_loss(inputs, ORPOParams()).losses).all()


@pytest.mark.parametrize("name", ["cpo", "orpo"])
def test_reference_free_rows_ask_for_no_reference(name):
    spec = METHODS[name]
    assert spec.reference_outputs == () and not spec.needs_token_logps


# --------------------------------------------------------------------------------------------
# knobs


def test_dpo_sft_weight_by_hand():
    """DPO's hand pair (z = 0.4, ℓ = 0.51301525) with |yw| = 3: NLL = 10/3 = 3.33333333;
    α=1: 0.51301525 + 3.33333333 = 3.84634859; α=0.5: 0.51301525 + 1.66666667 = 2.17968192.
    Rewards are DPO's (0.2, −0.2) whatever α."""
    inputs = LossInputs(policy_chosen_logps=t([-10.0]), policy_rejected_logps=t([-15.0]),
                        ref_chosen_logps=t([-12.0]), ref_rejected_logps=t([-13.0]),
                        chosen_mask=t([[0, 1, 1, 1]]), rejected_mask=t([[0, 1, 1, 0]]))
    out = dpo_loss(inputs, DPOParams(beta=0.1, sft_weight=1.0))
    assert out.losses.item() == pytest.approx(3.84634859, abs=1e-8)
    assert out.metrics["nll"].item() == pytest.approx(10 / 3, abs=TOL)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.2, -0.2), abs=TOL)
    half = dpo_loss(inputs, DPOParams(beta=0.1, sft_weight=0.5))
    assert half.losses.item() == pytest.approx(2.17968192, abs=1e-8)


def test_dpo_sft_weight_zero_is_plain_dpo_and_the_nll_is_length_averaged():
    fields = random_fields(seed=31)
    spec = METHODS["dpo"]
    plain = dpo_loss(inputs_for(spec, fields), DPOParams())
    assert "nll" not in plain.metrics
    rpo = dpo_loss(inputs_for(spec, fields), DPOParams(sft_weight=2.0))
    lengths = fields["chosen_mask"].sum(-1)
    torch.testing.assert_close(rpo.losses, plain.losses - 2.0 * fields["policy_chosen_logps"] / lengths,
                               rtol=0, atol=1e-14)


def test_dpo_sft_weight_raises_the_chosen_gradient():
    """The NLL adds −α/|yw| to ∂loss/∂log πθ(yw) and nothing to the rejected side."""
    fields = random_fields(seed=32)
    spec = METHODS["dpo"]
    out = {}
    for alpha in (0.0, 1.0):
        pw = fields["policy_chosen_logps"].clone().requires_grad_(True)
        pl = fields["policy_rejected_logps"].clone().requires_grad_(True)
        loss = dpo_loss(inputs_for(spec, fields, policy_chosen_logps=pw, policy_rejected_logps=pl),
                        DPOParams(sft_weight=alpha)).losses.sum()
        out[alpha] = torch.autograd.grad(loss, (pw, pl))
    torch.testing.assert_close(out[1.0][0] - out[0.0][0], -1.0 / fields["chosen_mask"].sum(-1), rtol=0, atol=1e-14)
    torch.testing.assert_close(out[1.0][1], out[0.0][1], rtol=0, atol=0)


def test_simpo_gamma_beta_ratio_is_gamma_over_beta():
    """β=2, γ/β = 0.25 -> γ = 0.5: test_simpo_by_hand's 0.20141328 (z = 2 − 0.5 = 1.5)."""
    by_ratio = SimPOParams(beta=2.0, gamma_beta_ratio=0.25)
    assert by_ratio.margin == 0.5 and by_ratio.gamma is None
    assert simpo_loss(simpo_pair(), by_ratio).losses.item() == pytest.approx(0.20141328, abs=1e-8)
    assert SimPOParams().gamma == 0.5 and SimPOParams().margin == 0.5
    assert SimPOParams(beta=2.5, gamma=0.3).margin == 0.3


def test_simpo_refuses_both_gamma_and_ratio():
    with pytest.raises(ValueError, match=r"SimPOParams: gamma and gamma_beta_ratio are both set.*keep one"):
        SimPOParams(gamma=0.5, gamma_beta_ratio=0.25)
    with pytest.raises(ValueError, match=r"SimPOParams: gamma_beta_ratio must be >= 0"):
        SimPOParams(gamma_beta_ratio=-0.1)


def test_simpo_params_round_trip_through_their_own_fields():
    """A resolved config re-read (resume) must load: the fields after __post_init__ build the same params."""
    import dataclasses

    for params in (SimPOParams(), SimPOParams(beta=2.5, gamma_beta_ratio=0.4)):
        again = SimPOParams(**dataclasses.asdict(params))
        assert again == params and again.margin == params.margin


@pytest.mark.parametrize("cls,kwargs,word", [
    (CPOParams, {"beta": 0.0}, "beta"), (CPOParams, {"cpo_alpha": -1.0}, "cpo_alpha"),
    (CPOParams, {"label_smoothing": 0.5}, "label_smoothing"), (ORPOParams, {"beta": 0.0}, "beta"),
    (DPOParams, {"sft_weight": -0.1}, "sft_weight"),
])
def test_params_refuse_bad_values(cls, kwargs, word):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {word}"):
        cls(**kwargs)


def test_defaults():
    assert (CPOParams().beta, CPOParams().cpo_alpha, ORPOParams().beta, DPOParams().sft_weight) == (0.1, 1.0, 0.1, 0.0)
