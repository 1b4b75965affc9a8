"""The DPO-family rows beyond DPO (TRL's loss types): hand-worked values, the reductions each paper
states, and the shape properties the generic tests in test_losses.py leave out.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses_dpo_family.py -q

Unless a test says otherwise, the hand examples use DPO's pair from test_losses.py: log πθ(yw)=−10,
log πref(yw)=−12, log πθ(yl)=−15, log πref(yl)=−13, so a = 2, b = −2, Δ = 4 and at β=0.1
β·a = 0.2, β·b = −0.2, z = β·Δ = 0.4. ℓ(z) = −log σ(z) = log(1 + e^{−z}): ℓ(0.4) = 0.51301525,
ℓ(−0.4) = 0.4 + ℓ(0.4) = 0.91301525, ℓ(0.2) = 0.59813887, ℓ(−0.2) = 0.79813887. σ(0.2) = 0.54983400,
σ(0.4) = 0.59868766.
"""

import math

import pytest
import torch

from loss_fields import F64, LN2, PARAMS, TOL, inputs_for, random_fields, softplus_neg, t
from sparsepo.losses import (
    METHODS,
    AOTParams,
    APOParams,
    BCOParams,
    DiscoPOPParams,
    DPOParams,
    ExoParams,
    HingeParams,
    LossInputs,
    NCAParams,
    RobustParams,
    SigmoidNormParams,
    SPPOParams,
    aot_loss,
    aot_pair_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    nca_pair_loss,
    robust_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)


def pair(pw=(-10.0,), rw=(-12.0,), pl=(-15.0,), rl=(-13.0,), mw=None, ml=None):
    """Sequence log-probs as given; masks of 3 response tokens unless stated."""
    n = len(pw)
    return LossInputs(policy_chosen_logps=t(list(pw)), ref_chosen_logps=t(list(rw)),
                      policy_rejected_logps=t(list(pl)), ref_rejected_logps=t(list(rl)),
                      chosen_mask=t(mw) if mw is not None else torch.ones(n, 3, dtype=F64),
                      rejected_mask=t(ml) if ml is not None else torch.ones(n, 3, dtype=F64))


def test_quoted_constants():
    assert softplus_neg(0.4) == pytest.approx(0.51301525, abs=1e-8)
    assert softplus_neg(-0.4) == pytest.approx(0.91301525, abs=1e-8)
    assert (softplus_neg(0.2), softplus_neg(-0.2)) == pytest.approx((0.59813887, 0.79813887), abs=1e-8)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert (sig(0.2), sig(0.4)) == pytest.approx((0.54983400, 0.59868766), abs=1e-8)


# --------------------------------------------------------------------------------------------
# hand-worked values


def test_hinge_by_hand():
    """β=0.1: relu(1 − 0.4) = 0.6. Second pair a=8, b=−4: β·Δ = 1.2 ≥ 1 -> loss 0, and no gradient.
    Rewards β·a, β·b = (0.2, −0.2) and (0.8, −0.4)."""
    inputs = pair(pw=(-10.0, -4.0), rw=(-12.0, -12.0), pl=(-15.0, -8.0), rl=(-13.0, -4.0))
    out = hinge_loss(inputs, HingeParams(beta=0.1))
    assert out.losses.tolist() == pytest.approx([0.6, 0.0], abs=TOL)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.8], abs=TOL)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.2, -0.4], abs=TOL)
    grad, _ = grads(hinge_loss, HingeParams(beta=0.1), inputs)
    assert grad.tolist() == pytest.approx([-0.1, 0.0], abs=TOL)


def test_robust_by_hand():
    """β=0.1, ε=0.1, z=0.4: ((1−ε)·ℓ(z) − ε·ℓ(−z))/(1−2ε) = (0.9·0.51301525 − 0.1·0.91301525)/0.8
    = (0.46171373 − 0.09130153)/0.8 = 0.46301525. Since ℓ(−z) = z + ℓ(z) this is ℓ(z) − ε·z/(1−2ε)
    = 0.51301525 − 0.05."""
    out = robust_loss(pair(), RobustParams(beta=0.1, label_smoothing=0.1))
    assert out.losses.item() == pytest.approx(0.46301525, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.2, -0.2), abs=TOL)


def test_exo_pair_by_hand():
    """β=0.1, ε=1e-3, z=0.4: q = σ(0.4) = 0.59868766, log q = −0.51301525, 1−q = 0.40131234,
    log(1−q) = −0.91301525; log(1−ε) = −0.00100050, log ε = −6.90775528.
    loss = 0.59868766·(−0.51301525 + 0.00100050) + 0.40131234·(−0.91301525 + 6.90775528)
         = −0.30653329 + 2.40579952 = 2.09922623."""
    out = exo_pair_loss(pair(), ExoParams(beta=0.1, label_smoothing=1e-3))
    assert out.losses.item() == pytest.approx(2.09922623, abs=1e-8)


def test_nca_pair_by_hand():
    """β=0.1, r(yw) = 0.2, r(yl) = −0.2: −log σ(0.2) − ½·log σ(−0.2) − ½·log σ(0.2)
    = 1.5·ℓ(0.2) + 0.5·ℓ(−0.2) = 0.89720831 + 0.39906944 = 1.29627774."""
    out = nca_pair_loss(pair(), NCAParams(beta=0.1))
    assert out.losses.item() == pytest.approx(1.29627774, abs=1e-8)


def test_bco_pair_by_hand():
    """β=0.1. One pair: rewards 0.2, −0.2, δ = their mean 0: loss = ℓ(0.2) + ℓ(0.2) = 1.19627774.
    Two pairs (second: a = 3, b = 1 -> rewards 0.3, 0.1): δ = mean(0.2, −0.2, 0.3, 0.1) = 0.1.
    Pair 0: ℓ(0.2 − 0.1) + ℓ(−(−0.2 − 0.1)) = ℓ(0.1) + ℓ(0.3) = 0.64439666 + 0.55435524 = 1.19875190;
    pair 1: ℓ(0.3 − 0.1) + ℓ(−(0.1 − 0.1)) = 0.59813887 + ln 2 = 1.29128605. reward_baseline = 0.1.
    baseline="none" (δ = 0) on pair 1: ℓ(0.3) + ℓ(−0.1) = 0.55435524 + 0.74439666 = 1.29875190."""
    one = bco_pair_loss(pair(), BCOParams(beta=0.1))
    assert one.losses.item() == pytest.approx(1.19627774, abs=1e-8)
    two_inputs = pair(pw=(-10.0, -5.0), rw=(-12.0, -8.0), pl=(-15.0, -6.0), rl=(-13.0, -7.0))
    two = bco_pair_loss(two_inputs, BCOParams(beta=0.1))
    assert two.losses.tolist() == pytest.approx([1.19875190, 1.29128605], abs=1e-8)
    assert two.metrics["reward_baseline"].item() == pytest.approx(0.1, abs=TOL)
    none = bco_pair_loss(two_inputs, BCOParams(beta=0.1, baseline="none"))
    assert none.losses[1].item() == pytest.approx(1.29875190, abs=1e-8)


def test_sppo_hard_by_hand():
    """β=0.1 -> targets ±1/(2β) = ±5: (2 − 5)² + (−2 + 5)² = 9 + 9 = 18.
    At a = 5, b = −5 (log πθ(yw) = −7, log πθ(yl) = −18) the loss is 0, its minimum."""
    assert sppo_hard_loss(pair(), SPPOParams(beta=0.1)).losses.item() == pytest.approx(18.0, abs=TOL)
    at_target = sppo_hard_loss(pair(pw=(-7.0,), pl=(-18.0,)), SPPOParams(beta=0.1))
    assert at_target.losses.item() == pytest.approx(0.0, abs=TOL)


AOT_INPUTS = dict(pw=(-10.0, -8.0), rw=(-12.0, -6.0), pl=(-15.0, -7.0), rl=(-13.0, -9.0))
"""Pair 0 as above; pair 1: log πθ(yw) = −8, log πref(yw) = −6, log πθ(yl) = −7, log πref(yl) = −9."""


def test_aot_by_hand():
    """β=0.1. Policy margins log πθ(yw) − log πθ(yl): 5, −1 -> sorted (−1, 5); reference margins
    1, 3 -> sorted (1, 3); δ = (−2, 2): losses ℓ(−0.2) = 0.79813887, ℓ(0.2) = 0.59813887, mean 0.69813887.
    DPO pairs them unsorted: Δ = 5 − 1 = 4 and −1 − 3 = −4, mean (0.51301525 + 0.91301525)/2 = 0.71301525.
    Rewards stay per pair: a = (2, −2), b = (−2, 2) -> (0.2, −0.2), (−0.2, 0.2)."""
    out = aot_loss(pair(**AOT_INPUTS), AOTParams(beta=0.1))
    assert out.losses.tolist() == pytest.approx([0.79813887, 0.59813887], abs=1e-8)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, -0.2], abs=TOL)
    dpo = dpo_loss(pair(**AOT_INPUTS), DPOParams(beta=0.1))
    assert dpo.losses.mean().item() == pytest.approx(0.71301525, abs=1e-8)


def test_aot_pair_by_hand():
    """β=0.1. a = (2, −2) sorted (−2, 2); b = (−2, 2) sorted (−2, 2); δ = (0, 0): both losses ln 2."""
    out = aot_pair_loss(pair(**AOT_INPUTS), AOTParams(beta=0.1))
    assert out.losses.tolist() == pytest.approx([LN2, LN2], abs=TOL)


def test_apo_by_hand():
    """β=0.1, β·a = 0.2, β·b = −0.2.
    apo_zero: (1 − σ(0.2)) + σ(−0.2) = 2·σ(−0.2) = 2·0.45016600 = 0.90033201.
    apo_down: σ(0.2) + 1 − σ(0.4) = 0.54983400 + 1 − 0.59868766 = 0.95114634."""
    assert apo_zero_loss(pair(), APOParams(beta=0.1)).losses.item() == pytest.approx(0.90033201, abs=1e-8)
    assert apo_down_loss(pair(), APOParams(beta=0.1)).losses.item() == pytest.approx(0.95114634, abs=1e-8)


def test_discopop_by_hand():
    """β=0.1, τ=0.05, z=0.4: m = σ(0.4/0.05) = σ(8) = 0.99966465; e^{−0.4} = 0.67032005;
    loss = 0.00033535·0.51301525 + 0.99966465·0.67032005 = 0.67026729.
    At z=0 (all log-probs −5): m = ½, loss = ½·ln 2 + ½·e^0 = 0.84657359."""
    p = DiscoPOPParams(beta=0.1, tau=0.05)
    assert discopop_loss(pair(), p).losses.item() == pytest.approx(0.67026729, abs=1e-8)
    flat = pair(pw=(-5.0,), rw=(-5.0,), pl=(-5.0,), rl=(-5.0,))
    assert discopop_loss(flat, p).losses.item() == pytest.approx(0.5 * LN2 + 0.5, abs=TOL)


def test_sigmoid_norm_by_hand():
    """β=0.1, |yw| = 2, |yl| = 4: ā = 2/2 = 1.0, b̄ = −2/4 = −0.5; z = 0.1·1.5 = 0.15;
    loss = ℓ(0.15) = log(1 + e^{−0.15}) = 0.62095705. Rewards 0.1, −0.05."""
    inputs = pair(mw=[[0, 1, 1, 0, 0]], ml=[[0, 1, 1, 1, 1]])
    out = sigmoid_norm_loss(inputs, SigmoidNormParams(beta=0.1))
    assert out.losses.item() == pytest.approx(0.62095705, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.05), abs=TOL)


# --------------------------------------------------------------------------------------------
# reductions the papers state


def fields_of(name, seed):
    return inputs_for(METHODS[name], random_fields(seed=seed))


def test_robust_with_no_noise_is_dpo():
    dpo = dpo_loss(fields_of("dpo", 20), DPOParams(beta=0.1))
    robust = robust_loss(fields_of("robust", 20), RobustParams(beta=0.1, label_smoothing=0.0))
    torch.testing.assert_close(robust.losses, dpo.losses, rtol=0, atol=1e-15)


def test_robust_is_dpo_less_a_linear_term():
    """ℓ(−z) = z + ℓ(z) turns rDPO into ℓ(z) − ε·z/(1−2ε): unbiased, and unbounded below."""
    fields = random_fields(seed=21)
    a = fields["policy_chosen_logps"] - fields["ref_chosen_logps"]
    b = fields["policy_rejected_logps"] - fields["ref_rejected_logps"]
    z = 0.1 * (a - b)
    robust = robust_loss(inputs_for(METHODS["robust"], fields), RobustParams(beta=0.1, label_smoothing=0.2))
    dpo = dpo_loss(inputs_for(METHODS["dpo"], fields), DPOParams(beta=0.1))
    torch.testing.assert_close(robust.losses, dpo.losses - 0.2 * z / 0.6, rtol=0, atol=1e-12)


def test_sigmoid_norm_on_equal_lengths_is_dpo_at_beta_over_length():
    """|yw| = |yl| = n: β·(a/n − b/n) = (β/n)·Δ, so sigmoid_norm at β is DPO at β/n (here n = 3)."""
    inputs = pair(pw=(-10.0, -4.0), rw=(-12.0, -5.0), pl=(-15.0, -9.0), rl=(-13.0, -8.5))
    norm = sigmoid_norm_loss(inputs, SigmoidNormParams(beta=0.3))
    dpo = dpo_loss(inputs, DPOParams(beta=0.1))
    torch.testing.assert_close(norm.losses, dpo.losses, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [aot_loss, aot_pair_loss])
def test_aot_on_one_pair_is_dpo(fn):
    """Sorting one element does nothing: with a micro-batch of one pair both AOT rows are DPO."""
    inputs = pair()
    torch.testing.assert_close(fn(inputs, AOTParams(beta=0.1)).losses, dpo_loss(inputs, DPOParams(beta=0.1)).losses,
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["aot", "aot_pair"])
def test_aot_mean_ignores_pair_order_but_not_pairing(name):
    """Batch-coupled: reordering the pairs leaves the losses unchanged (they follow the sorted order)."""
    spec = METHODS[name]
    fields = random_fields(seed=22, B=5, T=6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = {k: (v[perm] if k in spec.required_fields and v.shape[0] == 5 else v) for k, v in fields.items()}
    a = spec.loss_fn(inputs_for(spec, fields), PARAMS[name])
    b = spec.loss_fn(inputs_for(spec, shuffled), PARAMS[name])
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=1e-15)


def test_apo_zero_is_anchored_and_dpo_is_not():
    """Adding c to both log πθ(yw) and log πθ(yl) leaves Δ (so DPO) unchanged but moves APO-zero:
    each response is anchored to its own reference."""
    base, shifted = pair(), pair(pw=(-9.0,), pl=(-14.0,))
    assert dpo_loss(base, DPOParams()).losses.item() == pytest.approx(dpo_loss(shifted, DPOParams()).losses.item(),
                                                                       abs=1e-12)
    assert apo_zero_loss(base, APOParams()).losses.item() != pytest.approx(
        apo_zero_loss(shifted, APOParams()).losses.item(), abs=1e-6)


def grads(fn, params, inputs):
    pw = inputs.policy_chosen_logps.clone().requires_grad_(True)
    pl = inputs.policy_rejected_logps.clone().requires_grad_(True)
    out = fn(LossInputs(**{**inputs.__dict__, "policy_chosen_logps": pw, "policy_rejected_logps": pl}), params)
    return torch.autograd.grad(out.losses.sum(), (pw, pl))


def test_apo_directions():
    """APO-zero raises the chosen likelihood and lowers the rejected; APO-down lowers both (the chosen
    gradient is positive where |β·a| < |β·Δ|, here a = 2, Δ = 4)."""
    gw, gl = grads(apo_zero_loss, APOParams(), pair())
    assert gw.item() < 0 < gl.item()
    gw, gl = grads(apo_down_loss, APOParams(), pair())
    assert gw.item() > 0 and gl.item() > 0


def test_discopop_is_not_monotone_near_zero():
    """Its slope in z is positive on about (−0.118, 0.072) at τ=0.05 and negative outside: at z = 0
    (all log-probs −5) raising the chosen log-prob raises the loss; at z = ±0.4 it lowers it."""
    for pw, rising in ((-5.0, True), (-9.0, False), (-1.0, False)):
        gw, _ = grads(discopop_loss, DiscoPOPParams(), pair(pw=(pw,), rw=(-5.0,), pl=(-5.0,), rl=(-5.0,)))
        assert (gw.item() > 0) is rising, pw


def test_nca_chosen_term_is_minimised_at_log_two():
    """d/dr [−log σ(r) − ½·log σ(−r)] = 1.5·σ(r) − 1 = 0 at r = ln 2: zero chosen gradient there."""
    inputs = pair(pw=(-12.0 + 10 * LN2,))  # β·a = ln 2 at β=0.1
    gw, gl = grads(nca_pair_loss, NCAParams(beta=0.1), inputs)
    assert gw.item() == pytest.approx(0.0, abs=1e-12) and gl.item() > 0


def test_exo_pair_is_zero_at_the_smoothed_label():
    """KL((q, 1−q) ‖ (1−ε, ε)) is 0 where q = 1−ε, i.e. z = log((1−ε)/ε) = 6.90675478 at ε=1e-3."""
    z = math.log(0.999 / 0.001)
    inputs = pair(pw=(-12.0 + 10 * z,), pl=(-13.0,))  # β·Δ = z at β=0.1
    assert exo_pair_loss(inputs, ExoParams(beta=0.1)).losses.item() == pytest.approx(0.0, abs=1e-12)


def test_bco_baseline_is_a_stop_gradient():
    """The gradient equals that of the same loss with δ held at its value: δ is detached."""
    fields = random_fields(seed=23)
    spec = METHODS["bco_pair"]
    inputs = inputs_for(spec, fields)
    gw, gl = grads(bco_pair_loss, BCOParams(beta=0.1), inputs)
    a = (fields["policy_chosen_logps"] - fields["ref_chosen_logps"]).requires_grad_(True)
    b = (fields["policy_rejected_logps"] - fields["ref_rejected_logps"]).requires_grad_(True)
    delta = torch.cat([0.1 * a, 0.1 * b]).mean().detach()
    fixed = -torch.nn.functional.logsigmoid(0.1 * a - delta) - torch.nn.functional.logsigmoid(-(0.1 * b - delta))
    ga, gb = torch.autograd.grad(fixed.sum(), (a, b))
    torch.testing.assert_close((gw, gl), (ga, gb), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls,kwargs,word", [
    (HingeParams, {"beta": 0.0}, "beta"), (RobustParams, {"label_smoothing": 0.5}, "label_smoothing"),
    (ExoParams, {"label_smoothing": 0.0}, "label_smoothing"), (NCAParams, {"beta": -1.0}, "beta"),
    (BCOParams, {"baseline": "running"}, "baseline"), (SPPOParams, {"beta": float("nan")}, "beta"),
    (AOTParams, {"label_smoothing": -0.1}, "label_smoothing"), (APOParams, {"beta": 0.0}, "beta"),
    (DiscoPOPParams, {"tau": 0.0}, "tau"), (SigmoidNormParams, {"beta": 0.0}, "beta"),
])
def test_params_refuse_bad_values(cls, kwargs, word):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {word}"):
        cls(**kwargs)


def test_defaults():
    assert (RobustParams().beta, RobustParams().label_smoothing) == (0.1, 0.1)
    assert (ExoParams().label_smoothing, DiscoPOPParams().tau, BCOParams().baseline) == (1e-3, 0.05, "batch_mean")
    assert all(cls().beta == 0.1 for cls in (HingeParams, NCAParams, SPPOParams, AOTParams, APOParams,
                                             DiscoPOPParams, SigmoidNormParams))
