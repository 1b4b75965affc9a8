"""Token- and feature-level rows (TDPO, FPO, SePO, SPO): hand-worked values, their stop-gradients
and selections, and their refusals. The generic checks every row gets are in test_losses.py.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses_token_level.py -q
"""

import pytest
import torch

from loss_fields import F64, PARAMS, TOL, inputs_for, random_fields, t
from sparsepo.losses import (
    METHODS,
    DPOParams,
    FPOParams,
    LossInputs,
    SePOParams,
    SimPOParams,
    SPOParams,
    TDPOParams,
    dpo_loss,
    fpo_loss,
    select_tokens,
    sepo_loss,
    simpo_loss,
    spo_loss,
    tdpo1_loss,
    tdpo2_loss,
)


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
    rejected's masked-out t=4,5 must be ignored; eos ends each response (chosen t=5, rejected t=3).
    Worked per setting in the tests below."""
    return LossInputs(policy_chosen_logps=t([-8.0]), policy_rejected_logps=t([-7.0]),
                      chosen_eos_mask=t([[0, 0, 0, 0, 0, 1]]), rejected_eos_mask=t([[0, 0, 0, 1, 0, 0]]),
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


def test_sepo_exclude_eos_by_hand():
    """CEIL_ALL, γ=0.5, ρ=0.3, with the rejected eos (t=3, log-prob −2) given the lowest score −1.
    Default: rejected keeps ceil(0.9) = 1 token, the eos: r(yl) = 0.5·(−2) = −1; chosen as in
    test_sepo_by_hand, r(yw) = −0.5; z = 0.5, loss = log(1 + e^{−0.5}) = 0.47407698; eos selected in
    1 of 1 rejected responses, 0 of 1 chosen (its eos t=5 scores 0.3, below 0.9 and 0.5).
    exclude_eos: rejected candidates t=1,2 (N=2), ceil(0.6) = 1: −0.7 at t=2, log-prob −4, r(yl) = −2;
    chosen candidates t=1..4 keep ceil(1.2) = 2, the same t=2,4; z = 1.5, loss = 0.20141328."""
    inputs = sepo_hand_inputs()
    inputs.rejected_oracle_scores = t([[0, 0.4, -0.7, -1.0, -9, -9]])
    out = sepo_loss(inputs, SePOParams(gamma=0.5, rho=0.3, **CEIL_ALL))
    assert out.losses.item() == pytest.approx(0.47407698, abs=1e-8)
    assert (out.metrics["eos_selected_rejected"].item(), out.metrics["eos_selected_chosen"].item()) == (1.0, 0.0)
    kept = sepo_loss(inputs, SePOParams(gamma=0.5, rho=0.3, exclude_eos=True, **CEIL_ALL))
    assert kept.losses.item() == pytest.approx(0.20141328, abs=1e-8)
    assert kept.metrics["eos_selected_rejected"].item() == 0.0


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
                      sample_mask=t([[0, 1, 1], [0, 1, 0]]), ref_sample_topk_logps=ref, policy_sample_topk_logps=pol,
                      ref_sample_token_logps=ref[..., 0], policy_sample_token_logps=pol[..., 0])


def test_spo_by_hand():
    """β=0.1, kl_estimator="topk_tail". kl_reduction="sequence": per sample Σ_t = 2λ and λ, mean 1.5λ = 0.62774117;
    loss = 0.12692801 + 0.1·0.62774117 = 0.18970213.
    kl_reduction="token_mean": 3 tokens of λ -> λ; loss = 0.12692801 + 0.04184941 = 0.16877742."""
    out = spo_loss(spo_hand_inputs(), SPOParams(alpha=1.0, beta=0.1))
    assert out.losses.item() == pytest.approx(0.18970213, abs=1e-8)
    assert out.metrics["sample_kl"].item() == pytest.approx(0.62774117, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-10.0, -12.0), abs=TOL)
    per_token = spo_loss(spo_hand_inputs(), SPOParams(alpha=1.0, beta=0.1, kl_reduction="token_mean"))
    assert per_token.losses.item() == pytest.approx(0.16877742, abs=1e-8)


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


def test_spo_refuses_missing_or_empty_samples():
    fields = random_fields(seed=14)
    spec = METHODS["spo"]
    with pytest.raises(ValueError, match="'spo'.*sample_mask"):
        spo_loss(inputs_for(spec, fields, sample_mask=None), SPOParams())
    empty = dict(sample_mask=torch.zeros(0, 5, dtype=F64), ref_sample_topk_logps=torch.zeros(0, 5, 3, dtype=F64),
                 policy_sample_topk_logps=torch.zeros(0, 5, 3, dtype=F64),
                 ref_sample_token_logps=torch.zeros(0, 5, dtype=F64), policy_sample_token_logps=torch.zeros(0, 5, dtype=F64))
    with pytest.raises(ValueError, match="at least one policy sample"):
        spo_loss(inputs_for(spec, fields, **empty), SPOParams())


def test_fpo_refuses_a_reference_top_k_of_another_width():
    fields = random_fields(seed=15)
    with pytest.raises(ValueError, match="ref_chosen_feature_ids has 3 ids.*k=5"):
        fpo_loss(inputs_for(METHODS["fpo"], fields), FPOParams(k=5))
