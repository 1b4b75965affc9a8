"""The losses: hand-worked values, gradients, properties, and the method table's flags.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses.py -q
"""

import dataclasses
import math

import pytest
import torch

from sparsepo.losses import (
    BASE_FIELDS,
    FLAG_FIELDS,
    BCOParams,
    METHODS,
    DPOParams,
    FPOParams,
    IPOParams,
    LossInputs,
    SePOParams,
    SimPOParams,
    SPOParams,
    TDPOParams,
    dpo_loss,
    fpo_loss,
    get_method,
    ipo_loss,
    select_tokens,
    sepo_loss,
    simpo_loss,
    spo_loss,
    tdpo1_loss,
    tdpo2_loss,
)

from loss_fields import (  # noqa: E402  (tests/ is on sys.path, as for conftest)
    F64,
    LN2,
    PARAMS,
    TOL,
    inputs_for,
    optional_fields,
    policy_fields,
    random_fields,
    softplus_neg,
    t,
)

# --------------------------------------------------------------------------------------------
# hand-worked values


def test_dpo_by_hand():
    """β=0.1. Pair 0: log πθ(yw)=−10, log πref(yw)=−12, log πθ(yl)=−15, log πref(yl)=−13.
    r(yw) = 0.1·(−10+12) = 0.2, r(yl) = 0.1·(−15+13) = −0.2, z = 0.4;
    loss = log(1 + e^{−0.4}) = log(1.67032005) = 0.51301525.
    Pair 1: all log-probs −5 -> z = 0, loss = log 2 = 0.69314718.
    margin = mean(0.4, 0) = 0.2; accuracy = mean(0.2 > −0.2, 0 > 0) = 0.5.
    cDPO ε=0.1 on pair 0: 0.9·log(1+e^{−0.4}) + 0.1·log(1+e^{0.4}) = 0.51301525 + 0.1·0.4 = 0.55301525
    (since log(1+e^{z}) = z + log(1+e^{−z}))."""
    inputs = LossInputs(policy_chosen_logps=t([-10, -5]), policy_rejected_logps=t([-15, -5]),
                        ref_chosen_logps=t([-12, -5]), ref_rejected_logps=t([-13, -5]),
                        chosen_mask=torch.ones(2, 3, dtype=F64), rejected_mask=torch.ones(2, 3, dtype=F64))
    out = dpo_loss(inputs, DPOParams(beta=0.1))
    assert out.losses.tolist() == pytest.approx([0.51301525, 0.69314718], abs=1e-8)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.0], abs=TOL)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.2, 0.0], abs=TOL)
    assert out.metrics["margin"].item() == pytest.approx(0.2, abs=TOL)
    assert out.metrics["accuracy"].item() == 0.5
    smoothed = dpo_loss(inputs, DPOParams(beta=0.1, label_smoothing=0.1))
    assert smoothed.losses[0].item() == pytest.approx(0.55301525, abs=1e-8)


def test_ipo_by_hand():
    """β=0.1 -> target 1/(2β) = 5. |yw|=2, |yl|=4 (mask sums).
    chosen ratio = (−10 − (−12))/2 = 1.0; rejected ratio = (−15 − (−13))/4 = −0.5; h = 1.5;
    loss = (1.5 − 5)² = 12.25; rewards = 0.1·1.0 = 0.1 and 0.1·(−0.5) = −0.05."""
    inputs = LossInputs(policy_chosen_logps=t([-10]), policy_rejected_logps=t([-15]),
                        ref_chosen_logps=t([-12]), ref_rejected_logps=t([-13]),
                        chosen_mask=t([[0, 1, 1, 0, 0]]), rejected_mask=t([[0, 1, 1, 1, 1]]))
    out = ipo_loss(inputs, IPOParams(beta=0.1))
    assert out.losses.item() == pytest.approx(12.25, abs=TOL)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.05), abs=TOL)


def test_simpo_by_hand():
    """β=2, γ=0.5. log πθ(yw) = −6 over |yw|=3 -> r = 2·(−2) = −4; log πθ(yl) = −12 over |yl|=4 -> r = −6.
    z = −4 − (−6) − 0.5 = 1.5; loss = log(1 + e^{−1.5}) = log(1.22313016) = 0.20141328."""
    inputs = LossInputs(policy_chosen_logps=t([-6]), policy_rejected_logps=t([-12]),
                        chosen_mask=t([[0, 1, 1, 1, 0]]), rejected_mask=t([[0, 1, 1, 1, 1]]))
    out = simpo_loss(inputs, SimPOParams(beta=2.0, gamma=0.5))
    assert out.losses.item() == pytest.approx(0.20141328, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-4.0, -6.0), abs=TOL)


def tdpo_hand_inputs():
    """One pair, T=3 (t=0 padding). Sequence log-probs as in the DPO example (u = 0.4 at β=0.1).
    At every response position: reference top-2 probs (0.5, 0.375 | tail 0.125), policy at those ids
    (0.25, 0.25 | tail 0.5): KL(πref‖πθ) = 0.5·ln2 + 0.375·ln1.5 + 0.125·ln0.25 = 0.25 ln2 + 0.375 ln1.5
    = 0.17328680 + 0.15204941 = κ = 0.32533621 per token (the reverse KL is 0.41849411: direction matters).
    Chosen has 1 response token -> D(yw) = κ; rejected has 2 -> D(yl) = 2κ = 0.65067242."""
    ref = torch.tensor([0.5, 0.375], dtype=F64).log().expand(1, 3, 2).clone()
    pol = torch.tensor([0.25, 0.25], dtype=F64).log().expand(1, 3, 2).clone()
    ref[:, 0], pol[:, 0] = 0.0, 0.0  # position-0 padding, masked out
    return LossInputs(policy_chosen_logps=t([-10]), policy_rejected_logps=t([-15]),
                      ref_chosen_logps=t([-12]), ref_rejected_logps=t([-13]),
                      chosen_mask=t([[0, 1, 0]]), rejected_mask=t([[0, 1, 1]]),
                      ref_chosen_topk_logps=ref, policy_chosen_topk_logps=pol,
                      ref_rejected_topk_logps=ref.clone(), policy_rejected_topk_logps=pol.clone())


def test_tdpo1_by_hand():
    """β=0.1: δ = β·D(yl) − β·D(yw) = 0.1·(2κ − κ) = 0.03253362;
    z = 0.4 − 0.03253362 = 0.36746638; loss = log(1 + e^{−0.36746638}) = 0.52619881.
    Rewards (authors' convention β·(log-ratio + D)): 0.2 + 0.1·κ = 0.23253362 and
    −0.2 + 0.1·2κ = −0.13493276."""
    out = tdpo1_loss(tdpo_hand_inputs(), TDPOParams(beta=0.1))
    assert out.losses.item() == pytest.approx(0.52619881, abs=1e-8)
    assert out.chosen_rewards.item() == pytest.approx(0.23253362, abs=1e-8)
    assert out.rejected_rewards.item() == pytest.approx(-0.13493276, abs=1e-8)
    assert out.metrics["kl_chosen"].item() == pytest.approx(0.32533621, abs=1e-8)
    assert out.metrics["kl_rejected"].item() == pytest.approx(0.65067242, abs=1e-8)


def test_tdpo2_by_hand():
    """β=0.1, α=0.5: z = 0.4 − 0.5·0.03253362 = 0.38373319; loss = log(1 + e^{−0.38373319}) = 0.51957515."""
    out = tdpo2_loss(tdpo_hand_inputs(), TDPOParams(beta=0.1, alpha=0.5))
    assert out.losses.item() == pytest.approx(0.51957515, abs=1e-8)


def fpo_hand_inputs():
    """β=0.1, k=2, F=4. |yw| = 2, |yl| = 3.
    log πθ(yw) = −4 -> r(yw) = 0.1·(−4)/2 = −0.2;  log πref(yw) = −6 -> r_ref(yw) = −0.3
    log πθ(yl) = −9 -> r(yl) = 0.1·(−9)/3 = −0.3;  log πref(yl) = −6 -> r_ref(yl) = −0.2
    γ_ref = −0.3 − (−0.2) = −0.1.
    Rejected features c̄θ = [0, .3, .1, .4], ref ids [1, 2] values [.5, .1] -> D_F(yl) = 0.10, |I| = 3
    (test_pooled_union_mse_by_hand). Chosen c̄θ = [.6, 0, .2, .1]: topk = {0, 2}; ref ids [0, 3] values
    [.4, .1]; I = {0, 2, 3}: (.6−.4)² + (.2−0)² + (.1−.1)² = .04 + .04 + 0 = .08, /2 -> D_F(yw) = 0.04."""
    return LossInputs(policy_chosen_logps=t([-4]), policy_rejected_logps=t([-9]),
                      ref_chosen_logps=t([-6]), ref_rejected_logps=t([-6]),
                      chosen_mask=t([[0, 1, 1, 0]]), rejected_mask=t([[0, 1, 1, 1]]),
                      policy_chosen_features=t([[0.6, 0.0, 0.2, 0.1]]),
                      policy_rejected_features=t([[0.0, 0.3, 0.1, 0.4]]),
                      ref_chosen_feature_ids=torch.tensor([[0, 3]]), ref_chosen_feature_values=t([[0.4, 0.1]]),
                      ref_rejected_feature_ids=torch.tensor([[1, 2]]), ref_rejected_feature_values=t([[0.5, 0.1]]))


def test_fpo_by_hand():
    """z = r(yw) − r(yl) − γ_ref − α·(β·D_F(yl) − β·D_F(yw)) = −0.2 + 0.3 + 0.1 − 0.5·(0.010 − 0.004)
    = 0.2 − 0.003 = 0.197; loss = log(1 + e^{−0.197}) = 0.59949048.
    Rewards r − r_ref: −0.2 − (−0.3) = 0.1 and −0.3 − (−0.2) = −0.1; union_size = mean(3, 3) = 3."""
    out = fpo_loss(fpo_hand_inputs(), FPOParams(beta=0.1, alpha=0.5, k=2))
    assert out.losses.item() == pytest.approx(0.59949048, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.1), abs=TOL)
    assert out.metrics["feature_mse_chosen"].item() == pytest.approx(0.04, abs=TOL)
    assert out.metrics["feature_mse_rejected"].item() == pytest.approx(0.10, abs=TOL)
    assert out.metrics["union_size"].item() == 3.0


def test_fpo_with_alpha_zero_is_simpo_with_the_reference_margin():
    """α=0: z = r(yw) − r(yl) − γ_ref = −0.2 − (−0.3) − (−0.1) = 0.2; loss = log(1 + e^{−0.2}) = 0.59813887.
    The same number from simpo_loss with γ = γ_ref = −0.1 (SimPOParams refuses γ<0, so bypass it)."""
    out = fpo_loss(fpo_hand_inputs(), FPOParams(beta=0.1, alpha=0.0, k=2))
    assert out.losses.item() == pytest.approx(0.59813887, abs=1e-8)
    simpo_params = SimPOParams(beta=0.1, gamma=0.0)
    object.__setattr__(simpo_params, "gamma", -0.1)
    simpo = simpo_loss(fpo_hand_inputs(), simpo_params)
    assert out.losses.item() == pytest.approx(simpo.losses.item(), abs=1e-12)


def sepo_hand_inputs():
    """Chosen: mask on t=1..5 (|yw| = 5); rejected: mask on t=1..3 (|yl| = 3); the −9 scores at the
    rejected's masked-out t=4,5 must be ignored. Worked per setting in the tests below."""
    return LossInputs(policy_chosen_logps=t([-8.0]), policy_rejected_logps=t([-7.0]),
                      chosen_mask=t([[0, 1, 1, 1, 1, 1]]), rejected_mask=t([[0, 1, 1, 1, 0, 0]]),
                      policy_chosen_token_logps=t([[0, -1, -0.5, -2, -1.5, -3]]),
                      policy_rejected_token_logps=t([[0, -1, -4, -2, -0.1, -0.1]]),
                      chosen_oracle_scores=t([[0, 0.1, 0.9, -0.2, 0.5, 0.3]]),
                      rejected_oracle_scores=t([[0, 0.4, -0.7, 0.2, -9, -9]]))


CEIL_ALL = dict(rounding="ceil", min_tokens=1, skip_first_token=False)
"""The selection rule before the authors' defaults: ceil(ρ·|y|), at least 1, every response token."""


def test_sepo_by_hand():
    """Under CEIL_ALL, ρ=0.3: chosen keeps ceil(1.5) = 2 tokens, the top scores 0.9 (t=2) and 0.5 (t=4),
    log-probs −0.5 and −1.5 -> mean −1.0; rejected keeps ceil(0.9) = 1, the lowest −0.7 (t=2), log-prob −4.
    γ=0.5, normalise="selected": r(yw) = 0.5·(−1.0) = −0.5, r(yl) = 0.5·(−4) = −2; z = 1.5;
    loss = log(1 + e^{−1.5}) = 0.20141328. selected_fraction = (2 + 1)/(5 + 3) = 0.375.
    normalise="response": r(yw) = 0.5·(−2)/5 = −0.2, r(yl) = 0.5·(−4)/3 = −0.66666667, z = 0.46666667,
    loss = 0.48679258. normalise="none": r(yw) = −1, r(yl) = −2, z = 1, loss = log(1 + e^{−1}) = 0.31326169."""
    out = sepo_loss(sepo_hand_inputs(), SePOParams(gamma=0.5, rho=0.3, **CEIL_ALL))
    assert out.losses.item() == pytest.approx(0.20141328, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-0.5, -2.0), abs=TOL)
    assert out.metrics["selected_fraction"].item() == pytest.approx(0.375, abs=TOL)
    response = sepo_loss(sepo_hand_inputs(), SePOParams(gamma=0.5, rho=0.3, normalise="response", **CEIL_ALL))
    assert response.losses.item() == pytest.approx(0.48679258, abs=1e-8)
    plain = sepo_loss(sepo_hand_inputs(), SePOParams(gamma=0.5, rho=0.3, normalise="none", **CEIL_ALL))
    assert plain.losses.item() == pytest.approx(0.31326169, abs=1e-8)


def test_sepo_by_hand_with_the_authors_defaults():
    """Defaults (floor, first token never selected, min_tokens=1), γ=0.5, ρ=0.3. Chosen candidates
    t=2..5 (N=4): floor(1.2) = 1 token, the top score 0.9 (t=2), log-prob −0.5. Rejected candidates
    t=2,3 (N=2): floor(0.6) = 0, raised to min_tokens=1: the lowest −0.7 (t=2), log-prob −4.
    r(yw) = −0.25, r(yl) = −2, z = 1.75, loss = log(1 + e^{−1.75}) = 0.16022415. selected_fraction
    = 2/8 = 0.25. Oracle means: chosen selected 0.9, unselected (0.1 − 0.2 + 0.5 + 0.3)/4 = 0.175;
    rejected selected −0.7, unselected (0.4 + 0.2)/2 = 0.3.
    With min_tokens=0 (the authors' exact rule) the rejected side keeps nothing: r(yl) = 0,
    z = −0.25, loss = log(1 + e^{0.25}) = 0.82593942."""
    out = sepo_loss(sepo_hand_inputs(), SePOParams(gamma=0.5))
    assert out.losses.item() == pytest.approx(0.16022415, abs=1e-8)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["selected_fraction"] == pytest.approx(0.25, abs=TOL)
    assert (m["oracle_chosen_selected"], m["oracle_chosen_unselected"]) == pytest.approx((0.9, 0.175), abs=TOL)
    assert (m["oracle_rejected_selected"], m["oracle_rejected_unselected"]) == pytest.approx((-0.7, 0.3), abs=TOL)
    exact = sepo_loss(sepo_hand_inputs(), SePOParams(gamma=0.5, min_tokens=0))
    assert exact.losses.item() == pytest.approx(0.82593942, abs=1e-8)
    assert exact.rejected_rewards.item() == 0.0


def spo_hand_inputs():
    """α=1: log πθ(yw) = −10, log πθ(yl) = −12 -> z = 2, preference loss log(1 + e^{−2}) = 0.12692801.
    Two samples, T'=3: sample 0 has 2 generated tokens, sample 1 has 1. At every token the policy's
    probs at the reference's top-2 ids are (0.25, 0.25 | tail 0.5) and the reference's (0.5, 0.375 | 0.125):
    KL(πθ‖πref) = 0.25·ln(.25/.5) + 0.25·ln(.25/.375) + 0.5·ln(.5/.125) = 0.75 ln2 − 0.25 ln1.5
    = 0.51986039 − 0.10136628 = λ = 0.41849411 per token."""
    ref = torch.tensor([0.5, 0.375], dtype=F64).log().expand(2, 3, 2).clone()
    pol = torch.tensor([0.25, 0.25], dtype=F64).log().expand(2, 3, 2).clone()
    return LossInputs(policy_chosen_logps=t([-10]), policy_rejected_logps=t([-12]),
                      chosen_mask=t([[0, 1]]), rejected_mask=t([[0, 1]]),
                      sample_mask=t([[0, 1, 1], [0, 1, 0]]), ref_sample_topk_logps=ref, policy_sample_topk_logps=pol)


def test_spo_by_hand():
    """β=0.1. kl_estimator="sequence": per sample Σ_t = 2λ and λ, mean 1.5λ = 0.62774117;
    loss = 0.12692801 + 0.1·0.62774117 = 0.18970213.
    kl_estimator="token_mean": 3 tokens of λ -> λ; loss = 0.12692801 + 0.04184941 = 0.16877742."""
    out = spo_loss(spo_hand_inputs(), SPOParams(alpha=1.0, beta=0.1))
    assert out.losses.item() == pytest.approx(0.18970213, abs=1e-8)
    assert out.metrics["sample_kl"].item() == pytest.approx(0.62774117, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-10.0, -12.0), abs=TOL)
    per_token = spo_loss(spo_hand_inputs(), SPOParams(alpha=1.0, beta=0.1, kl_estimator="token_mean"))
    assert per_token.losses.item() == pytest.approx(0.16877742, abs=1e-8)


def test_hand_examples_agree_with_the_softplus_formula():
    """Guards the quoted constants above against typos: each is log(1 + e^{−z}) of the z worked out,
    and κ, λ are the two directions of the sparse KL used in the TDPO and SPO examples."""
    assert 0.25 * LN2 + 0.375 * math.log(1.5) == pytest.approx(0.32533621, abs=1e-8)
    assert 0.75 * LN2 - 0.25 * math.log(1.5) == pytest.approx(0.41849411, abs=1e-8)
    for z, value in [(0.4, 0.51301525), (1.5, 0.20141328), (0.36746638, 0.52619881), (0.38373319, 0.51957515),
                     (0.197, 0.59949048), (0.2, 0.59813887), (2.0, 0.12692801), (1.0, 0.31326169),
                     (0.46666667, 0.48679258)]:
        assert softplus_neg(z) == pytest.approx(value, abs=1e-8)


# --------------------------------------------------------------------------------------------
# gradients


# Inputs behind a stop-gradient: the value depends on them but the gradient is zero by design, so
# finite differences cannot agree there (tested separately below).
STOP_GRADIENT = {"tdpo2": {"policy_chosen_topk_logps"}, "fpo": {"policy_chosen_features"}}


# bco_pair's reward shift δ is a detached batch mean (a stop-gradient through every input): checked
# here with δ=0 and against the fixed-δ gradient in test_losses_dpo_family.py.
GRADCHECK_PARAMS = {"bco_pair": BCOParams(baseline="none")}


@pytest.mark.parametrize("name", list(METHODS))
def test_gradcheck_wrt_policy_inputs(name):
    spec = METHODS[name]
    params = GRADCHECK_PARAMS.get(name, PARAMS[name])
    fields = random_fields(seed=1)
    names = [n for n in policy_fields(spec) if n not in STOP_GRADIENT.get(name, ())]
    leaves = tuple(fields[n].clone().requires_grad_(True) for n in names)

    def losses(*xs):
        return spec.loss_fn(inputs_for(spec, fields, **dict(zip(names, xs))), params).losses

    assert torch.autograd.gradcheck(losses, leaves)


# Not monotone in the chosen log-prob, by design; each has its own shape test in test_losses_dpo_family.py.
NOT_MONOTONE = {"apo_down": "pushes the chosen log-ratio down", "discopop": "slope > 0 near β·Δ = 0"}


@pytest.mark.parametrize("name", [n for n in METHODS if n not in NOT_MONOTONE])
def test_raising_the_chosen_logprob_lowers_the_loss(name):
    """+0.3 on every chosen response token (and |yw|·0.3 on the sequence sum) lowers every pair's loss.
    (IPO only while h < 1/(2β), which holds here: the random log-ratios are O(1) and 1/(2β) = 5.)"""
    spec = METHODS[name]
    fields = random_fields(seed=2)
    before = spec.loss_fn(inputs_for(spec, fields), PARAMS[name]).losses
    bump = 0.3 * fields["chosen_mask"]
    raised = dict(fields, policy_chosen_token_logps=fields["policy_chosen_token_logps"] + bump,
                  policy_chosen_logps=fields["policy_chosen_logps"] + bump.sum(-1))
    after = spec.loss_fn(inputs_for(spec, raised), PARAMS[name]).losses
    assert torch.all(after < before), (before, after)


@pytest.mark.parametrize("name", list(METHODS))
def test_rewards_and_metrics_are_detached(name):
    spec = METHODS[name]
    fields = random_fields(seed=3)
    grads = {n: fields[n].clone().requires_grad_(True) for n in policy_fields(spec)}
    out = spec.loss_fn(inputs_for(spec, fields, **grads), PARAMS[name])
    assert out.losses.requires_grad and out.losses.shape == (2,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.shape == out.rejected_rewards.shape == (2,)
    assert {"margin", "accuracy"} <= set(out.metrics)
    for key, value in out.metrics.items():
        assert value.dim() == 0 and not value.requires_grad, key


def test_sepo_gradient_touches_only_selected_tokens():
    fields = random_fields(seed=4)
    spec = METHODS["sepo"]
    chosen = fields["policy_chosen_token_logps"].clone().requires_grad_(True)
    rejected = fields["policy_rejected_token_logps"].clone().requires_grad_(True)
    out = sepo_loss(inputs_for(spec, fields, policy_chosen_token_logps=chosen,
                               policy_rejected_token_logps=rejected), PARAMS["sepo"])
    g_chosen, g_rejected = torch.autograd.grad(out.losses.sum(), (chosen, rejected))
    p = PARAMS["sepo"]
    knobs = dict(rounding=p.rounding, min_tokens=p.min_tokens, skip_first_token=p.skip_first_token)
    sel_w = select_tokens(fields["chosen_oracle_scores"], fields["chosen_mask"], p.rho, largest=True, **knobs)
    sel_l = select_tokens(fields["rejected_oracle_scores"], fields["rejected_mask"], p.rho, largest=False, **knobs)
    assert sel_w.sum() > 0 and sel_l.sum() > 0
    assert torch.equal(g_chosen != 0, sel_w != 0)
    assert torch.equal(g_rejected != 0, sel_l != 0)
    assert torch.all(g_chosen <= 0) and torch.all(g_rejected >= 0)


def test_fpo_stop_gradient_on_the_chosen_feature_term():
    """No gradient reaches policy_chosen_features (its only term is sg(β·D_F(yw))), though the value uses
    them; the rejected features get gradient exactly on their union I."""
    fields = random_fields(seed=5)
    spec = METHODS["fpo"]
    fw = fields["policy_chosen_features"].clone().requires_grad_(True)
    fl = fields["policy_rejected_features"].clone().requires_grad_(True)
    out = fpo_loss(inputs_for(spec, fields, policy_chosen_features=fw, policy_rejected_features=fl), PARAMS["fpo"])
    g_w, g_l = torch.autograd.grad(out.losses.sum(), (fw, fl), allow_unused=True)
    assert g_w is None or torch.all(g_w == 0)
    k = PARAMS["fpo"].k
    union = torch.zeros_like(fl, dtype=torch.bool)
    union.scatter_(1, fl.detach().topk(k, -1).indices, True).scatter_(1, fields["ref_rejected_feature_ids"], True)
    assert torch.equal(g_l != 0, union)
    moved = fpo_loss(inputs_for(spec, fields, policy_chosen_features=fw.detach() + 1.0), PARAMS["fpo"])
    assert not torch.allclose(moved.losses, out.losses)


def test_tdpo2_with_alpha_zero_is_exactly_dpo():
    fields = random_fields(seed=6)
    tdpo = tdpo2_loss(inputs_for(METHODS["tdpo2"], fields), TDPOParams(beta=0.1, alpha=0.0))
    dpo = dpo_loss(inputs_for(METHODS["dpo"], fields), DPOParams(beta=0.1))
    assert torch.equal(tdpo.losses, dpo.losses)


def test_tdpo2_stops_the_chosen_kl_gradient_and_tdpo1_does_not():
    fields = random_fields(seed=7)
    grads = {}
    for name, fn in (("tdpo1", tdpo1_loss), ("tdpo2", tdpo2_loss)):
        pol_w = fields["policy_chosen_topk_logps"].clone().requires_grad_(True)
        seq_w = fields["policy_chosen_logps"].clone().requires_grad_(True)
        out = fn(inputs_for(METHODS[name], fields, policy_chosen_topk_logps=pol_w, policy_chosen_logps=seq_w),
                 TDPOParams())
        grads[name] = torch.autograd.grad(out.losses.sum(), pol_w, allow_unused=True)[0]
    assert grads["tdpo2"] is None or torch.all(grads["tdpo2"] == 0)
    assert grads["tdpo1"].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# properties


def duplicate_tokens(fields):
    """Every response token twice: sequence log-probs double, lengths double, pooled features unchanged."""
    out = dict(fields)
    for key in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        out[key] = 2 * fields[key]
    for key in ("chosen_mask", "rejected_mask"):
        out[key] = torch.cat([fields[key], fields[key]], dim=-1)
    return out


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.length_normalised])
def test_length_normalised_methods_ignore_duplicated_tokens(name):
    spec = METHODS[name]
    fields = random_fields(seed=8)
    once = spec.loss_fn(inputs_for(spec, fields), PARAMS[name])
    twice = spec.loss_fn(inputs_for(spec, duplicate_tokens(fields)), PARAMS[name])
    torch.testing.assert_close(twice.losses, once.losses, rtol=0, atol=1e-12)
    torch.testing.assert_close(twice.chosen_rewards, once.chosen_rewards, rtol=0, atol=1e-12)


def test_dpo_is_not_length_normalised():
    """The same duplication changes DPO's loss: the property above is not vacuous."""
    fields = random_fields(seed=8)
    once = dpo_loss(inputs_for(METHODS["dpo"], fields), DPOParams())
    twice = dpo_loss(inputs_for(METHODS["dpo"], duplicate_tokens(fields)), DPOParams())
    assert not torch.allclose(once.losses, twice.losses)


@pytest.mark.parametrize("name", list(METHODS))
def test_unpromised_fields_are_ignored(name):
    """Filling every field the flags do not promise (with random values) changes nothing: the loss reads
    only its promised inputs. For simpo and sepo this is 'reference-free ignores reference inputs'."""
    spec = METHODS[name]
    fields = random_fields(seed=9)
    other = random_fields(seed=10)
    extra = {n: other[n] for n in other if n not in spec.required_fields}
    base = spec.loss_fn(inputs_for(spec, fields), PARAMS[name])
    full = spec.loss_fn(inputs_for(spec, fields, **extra), PARAMS[name])
    assert torch.equal(base.losses, full.losses)
    assert torch.equal(base.chosen_rewards, full.chosen_rewards)


@pytest.mark.parametrize("name", ["simpo", "sepo", "spo", "cpo", "orpo"])
def test_reference_free_methods_need_no_pair_reference(name):
    spec = METHODS[name]
    assert not spec.needs_reference and not spec.needs_ref_distributions
    fields = random_fields(seed=11)
    shifted = dict(fields, ref_chosen_logps=fields["ref_chosen_logps"] - 50, ref_rejected_logps=fields["ref_rejected_logps"] + 50)
    a = spec.loss_fn(inputs_for(spec, fields, ref_chosen_logps=fields["ref_chosen_logps"],
                                ref_rejected_logps=fields["ref_rejected_logps"]), PARAMS[name])
    b = spec.loss_fn(inputs_for(spec, shifted, ref_chosen_logps=shifted["ref_chosen_logps"],
                                ref_rejected_logps=shifted["ref_rejected_logps"]), PARAMS[name])
    assert torch.equal(a.losses, b.losses)


# --------------------------------------------------------------------------------------------
# the table and its refusals


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_runs_on_exactly_what_its_flags_promise(name):
    spec = METHODS[name]
    assert spec.name == name
    out = spec.loss_fn(inputs_for(spec, random_fields(seed=12)), PARAMS[name])
    assert torch.isfinite(out.losses).all() and out.losses.shape == (2,)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_promised_field_is_read_and_its_absence_is_named(name):
    """Dropping any promised optional field raises ValueError naming the field and the method, so no
    flag over-promises and the message tells the trainer what to fill."""
    spec = METHODS[name]
    fields = random_fields(seed=13)
    for field in optional_fields(spec):
        with pytest.raises(ValueError, match=rf"'{name}'.*{field}"):
            spec.loss_fn(inputs_for(spec, fields, **{field: None}), PARAMS[name])


def test_flags_cover_every_optional_input_field():
    optional = {f.name for f in dataclasses.fields(LossInputs)} - set(BASE_FIELDS)
    promised = {name for names in FLAG_FIELDS.values() for name in names}
    assert promised == optional


def test_table_rows_are_as_designed():
    """The flags the trainer reads, row by row (SPO needs no pair-side reference; see tdpo/spo docstrings)."""
    flags = {name: tuple(flag for flag in (*FLAG_FIELDS, "length_normalised") if getattr(spec, flag))
             for name, spec in METHODS.items()}
    assert flags == {
        "dpo": ("needs_reference",),
        "ipo": ("needs_reference", "length_normalised"),
        "simpo": ("length_normalised",),
        "tdpo1": ("needs_reference", "needs_ref_distributions"),
        "tdpo2": ("needs_reference", "needs_ref_distributions"),
        "fpo": ("needs_reference", "needs_sae_features", "length_normalised"),
        "sepo": ("needs_token_logps", "needs_oracle_scores"),
        "spo": ("needs_policy_samples",),
        **{name: ("needs_reference",) for name in ("hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                                                   "sppo_hard", "aot", "aot_pair", "apo_zero", "apo_down", "discopop")},
        "sigmoid_norm": ("needs_reference", "length_normalised"),
        "cpo": (),
        "orpo": ("length_normalised",),
    }
    for spec in METHODS.values():
        assert "arXiv" in spec.paper
        assert dataclasses.is_dataclass(spec.params_cls)
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "x"


@pytest.mark.parametrize("typo,nearest", [("dop", "dpo"), ("simpoo", "simpo"), ("tdpo3", "tdpo[12]"), ("sepoo", "sepo"),
                                          ("FPO", "fpo"), ("Spo ", "spo")])
def test_get_method_suggests_the_nearest_name(typo, nearest):
    with pytest.raises(ValueError, match=rf"unknown method '{typo}'.*Did you mean '{nearest}'"):
        get_method(typo)
    assert get_method(nearest.replace("[12]", "1")).name == nearest.replace("[12]", "1")


@pytest.mark.parametrize("cls,kwargs,word", [
    (DPOParams, {"beta": 0.0}, "beta"), (DPOParams, {"label_smoothing": 0.5}, "label_smoothing"),
    (IPOParams, {"beta": -1.0}, "beta"), (SimPOParams, {"gamma": -0.1}, "gamma"),
    (TDPOParams, {"alpha": -0.5}, "alpha"), (FPOParams, {"k": 0}, "k"), (FPOParams, {"beta": float("nan")}, "beta"),
    (SePOParams, {"rho": 1.5}, "rho"), (SePOParams, {"normalise": "tokens"}, "normalise"),
    (SePOParams, {"rounding": "round"}, "rounding"), (SePOParams, {"min_tokens": -1}, "min_tokens"),
    (SPOParams, {"alpha": 0.0}, "alpha"), (SPOParams, {"kl_estimator": "k3"}, "kl_estimator"),
])
def test_params_refuse_bad_values(cls, kwargs, word):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {word}"):
        cls(**kwargs)


def test_params_are_keyword_only_and_default_to_the_table():
    assert DPOParams().beta == 0.1 and SimPOParams().beta == 2.0 and SimPOParams().gamma == 0.5
    assert (FPOParams().beta, FPOParams().alpha, FPOParams().k) == (0.1, 0.5, 50)
    assert (SePOParams().rho, SePOParams().gamma, SePOParams().rounding, SePOParams().skip_first_token) == \
        (0.3, 1.0, "floor", True)
    assert TDPOParams().alpha == 0.5 and SPOParams().alpha == 1.0
    with pytest.raises(TypeError):
        DPOParams(0.2)


def test_spo_refuses_missing_or_empty_samples():
    fields = random_fields(seed=14)
    spec = METHODS["spo"]
    with pytest.raises(ValueError, match="'spo'.*sample_mask"):
        spo_loss(inputs_for(spec, fields, sample_mask=None), SPOParams())
    empty = dict(sample_mask=torch.zeros(0, 5, dtype=F64), ref_sample_topk_logps=torch.zeros(0, 5, 3, dtype=F64),
                 policy_sample_topk_logps=torch.zeros(0, 5, 3, dtype=F64))
    with pytest.raises(ValueError, match="at least one policy sample"):
        spo_loss(inputs_for(spec, fields, **empty), SPOParams())


def test_fpo_refuses_a_reference_top_k_of_another_width():
    fields = random_fields(seed=15)
    with pytest.raises(ValueError, match="ref_chosen_feature_ids has 3 ids.*k=5"):
        fpo_loss(inputs_for(METHODS["fpo"], fields), FPOParams(k=5))
