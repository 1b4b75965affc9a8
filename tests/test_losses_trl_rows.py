"""The rows and knobs from TRL 1.16's menu (issue 24): CPO's hinge and ipo variants and `cpo_alpha`,
AlphaPO, `aot_unpaired`, f-DPO's divergences, WPO's `wpo_clip` and its weight on the NLL, by hand;
refusals; and what an older checkpoint's config means for them. Against TRL's own code:
tests/test_losses_trl.py (runs where TRL 1.16 imports).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_losses_trl_rows.py

ℓ(z) = −log σ(z) = log(1 + e^{−z}).
"""

import dataclasses
import json

import pytest
import torch

from loss_fields import PARAMS, TOL, inputs_for, random_fields, softplus_neg, t, wpo_inputs
from sparsepo.config import ConfigError, load_config, to_dict
from sparsepo.losses import METHODS, DPOParams, LossInputs, SimPOParams, chosen_nll, get_method, simpo_loss
from sparsepo.losses.cpo import AlphaPOParams, CPOMarginParams, alphapo_loss, cpo_hinge_loss, cpo_ipo_loss
from sparsepo.losses.knobs import wpo_weights

pytestmark = pytest.mark.unit
F_ROWS = ("dpo", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm")


def simpo_pair():
    """log πθ(yw) = −6 over |yw| = 3, log πθ(yl) = −12 over |yl| = 4 (test_simpo_by_hand's pair)."""
    return LossInputs(policy_chosen_logps=t([-6.0]), policy_rejected_logps=t([-12.0]),
                      chosen_mask=t([[0, 1, 1, 1, 0]]), rejected_mask=t([[0, 1, 1, 1, 1]]))


def dpo_pair():
    """test_dpo_by_hand's pair 0: a = −10 + 12 = 2, b = −15 + 13 = −2."""
    return LossInputs(policy_chosen_logps=t([-10.0]), policy_rejected_logps=t([-15.0]), ref_chosen_logps=t([-12.0]),
                      ref_rejected_logps=t([-13.0]), chosen_mask=t([[0, 1, 1]]), rejected_mask=t([[0, 1, 1]]))


def test_quoted_constants():
    assert softplus_neg(0.7253720815694038) == pytest.approx(0.39483844, abs=1e-8)
    assert softplus_neg(0.47008047745752055) == pytest.approx(0.48547826, abs=1e-8)
    assert softplus_neg(-0.31268850163498135) == pytest.approx(0.86166373, abs=1e-8)


def test_cpo_hinge_and_ipo_by_hand():
    """β=0.1, cpo_alpha=1, NLL = 6/3 = 2.
    hinge: Δ = −6 + 12 = 6, relu(1 − 0.6) = 0.4; loss 2.4; rewards β·log πθ: −0.6, −1.2.
    ipo: averages −2 and −3, h = 1, (1 − 1/(2β))² = (1 − 5)² = 16; loss 18; rewards β·average: −0.2, −0.3.
    cpo_alpha=0: 0.4 and 16; at β = 0.2 the hinge is relu(1 − 1.2) = 0 (flat past the margin)."""
    hinge = cpo_hinge_loss(simpo_pair(), CPOMarginParams())
    assert hinge.losses.item() == pytest.approx(2.4, abs=TOL) and hinge.metrics["nll"].item() == pytest.approx(2.0)
    assert (hinge.chosen_rewards.item(), hinge.rejected_rewards.item()) == pytest.approx((-0.6, -1.2), abs=TOL)
    ipo = cpo_ipo_loss(simpo_pair(), CPOMarginParams())
    assert ipo.losses.item() == pytest.approx(18.0, abs=TOL)
    assert (ipo.chosen_rewards.item(), ipo.rejected_rewards.item()) == pytest.approx((-0.2, -0.3), abs=TOL)
    assert cpo_hinge_loss(simpo_pair(), CPOMarginParams(cpo_alpha=0.0)).losses.item() == pytest.approx(0.4, abs=TOL)
    assert cpo_ipo_loss(simpo_pair(), CPOMarginParams(cpo_alpha=0.0)).losses.item() == pytest.approx(16.0, abs=TOL)
    assert cpo_hinge_loss(simpo_pair(), CPOMarginParams(beta=0.2, cpo_alpha=0.0)).losses.item() == 0.0


def test_alphapo_by_hand():
    """β=0.1, γ=0.5, α=0.25, cpo_alpha=0. log p̄ = −2 and −3:
    r̃(yw) = (1 − e^{0.5})/0.25 = −2.59488508, r̃(yl) = (1 − e^{0.75})/0.25 = −4.46800007;
    z = 0.1·1.87311498 − 0.5 = −0.31268850, loss ℓ(z) = 0.86166373; rewards β·r̃: −0.25948851, −0.44680001.
    With cpo_alpha=1 the NLL 2 is added: 2.86166373."""
    out = alphapo_loss(simpo_pair(), AlphaPOParams())
    assert out.losses.item() == pytest.approx(0.86166373, abs=1e-8)
    assert out.chosen_rewards.item() == pytest.approx(-0.25948851, abs=1e-8)
    assert out.rejected_rewards.item() == pytest.approx(-0.44680001, abs=1e-8)
    assert alphapo_loss(simpo_pair(), AlphaPOParams(cpo_alpha=1.0)).losses.item() == pytest.approx(2.86166373, abs=1e-8)


def test_alphapo_at_alpha_zero_is_simpo():
    """α → 0: (1 − p̄^{−α})/α → log p̄, SimPO's reward: α = 0 exactly, α = 1e-7 to 1e-6 relative."""
    fields = random_fields(seed=40)
    inputs = inputs_for(METHODS["alphapo"], fields)
    simpo = simpo_loss(inputs, SimPOParams(beta=2.0, gamma=0.5)).losses
    zero = alphapo_loss(inputs, AlphaPOParams(beta=2.0, gamma=0.5, alpha=0.0)).losses
    assert torch.equal(zero, simpo)
    near = alphapo_loss(inputs, AlphaPOParams(beta=2.0, gamma=0.5, alpha=1e-7)).losses
    torch.testing.assert_close(near, simpo, rtol=1e-6, atol=0)
    assert not torch.allclose(alphapo_loss(inputs, AlphaPOParams(beta=2.0, gamma=0.5)).losses, simpo)


def test_aot_unpaired_is_aot_pair_under_trls_name():
    fields = random_fields(seed=41)
    a = METHODS["aot_unpaired"].loss_fn(inputs_for(METHODS["aot_unpaired"], fields), PARAMS["aot_unpaired"])
    b = METHODS["aot_pair"].loss_fn(inputs_for(METHODS["aot_pair"], fields), PARAMS["aot_pair"])
    assert torch.equal(a.losses, b.losses) and METHODS["aot_unpaired"].params_cls is METHODS["aot_pair"].params_cls
    with pytest.raises(ValueError, match="'aot_unpaired'.*ref_chosen_logps"):
        METHODS["aot_unpaired"].loss_fn(inputs_for(METHODS["aot_unpaired"], fields, ref_chosen_logps=None),
                                        PARAMS["aot_unpaired"])


def test_f_dpo_by_hand():
    """β=0.1 on a = 2, b = −2 (reverse KL: z = 0.4, ℓ = 0.51301525).
    forward_kl, f'(u) = 1 − 1/u: (1 − e^{−2}) − (1 − e^{2}) = 7.25372082, z = 0.72537208, ℓ = 0.39483844.
    js_divergence, f'(u) = log 2 + log σ(log u): log σ(2) − log σ(−2) = 2, so z = 0.2, ℓ = 0.59813887
    (JS halves a symmetric pair's margin).
    alpha_divergence c=0.5, f'(u) = (u^{−0.5} − 1)/(−0.5): 2(1 − e^{−1}) − 2(1 − e) = 4.70080477, ℓ = 0.48547826.
    c = 1 is reverse KL and c = 0 forward KL. Rewards stay β·a, β·b = 0.2, −0.2 for all."""
    cases = {"reverse_kl": 0.51301525, "forward_kl": 0.39483844, "js_divergence": 0.59813887,
             "alpha_divergence": 0.48547826}
    for kind, value in cases.items():
        out = METHODS["dpo"].loss_fn(dpo_pair(), DPOParams(f_divergence_type=kind))
        assert out.losses.item() == pytest.approx(value, abs=1e-8), kind
        assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.2, -0.2), abs=TOL)
    alpha = dict(f_divergence_type="alpha_divergence")
    assert METHODS["dpo"].loss_fn(dpo_pair(), DPOParams(**alpha, f_alpha_divergence_coef=1.0)).losses.item() == \
        pytest.approx(0.51301525, abs=1e-8)
    assert METHODS["dpo"].loss_fn(dpo_pair(), DPOParams(**alpha, f_alpha_divergence_coef=0.0)).losses.item() == \
        pytest.approx(0.39483844, abs=1e-8)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", F_ROWS)
def test_f_divergence_rows_in_float64(name, kind):
    """On every row that takes it: gradcheck wrt the policy's sequence log-probs, and each divergence
    differs from reverse KL on the random pairs (the knob reaches the loss)."""
    base = IPO_SEQ if name == "ipo" else PARAMS[name]
    params = dataclasses.replace(base, f_divergence_type=kind)
    fields = random_fields(seed=42)
    spec = METHODS[name]
    leaves = tuple(fields[n].clone().requires_grad_(True) for n in ("policy_chosen_logps", "policy_rejected_logps"))

    def losses(pw, pl):
        return spec.loss_fn(inputs_for(spec, fields, policy_chosen_logps=pw, policy_rejected_logps=pl), params).losses

    assert torch.autograd.gradcheck(losses, leaves)
    plain = spec.loss_fn(inputs_for(spec, fields), base)
    bent = spec.loss_fn(inputs_for(spec, fields), params)
    assert not torch.allclose(plain.losses, bent.losses)
    assert torch.equal(plain.chosen_rewards, bent.chosen_rewards)


IPO_SEQ = dataclasses.replace(PARAMS["ipo"], h="sequence")


def test_f_divergence_refusals():
    with pytest.raises(ValueError, match="DPOParams: f_divergence_type must be one of"):
        DPOParams(f_divergence_type="kl")
    with pytest.raises(ValueError, match="DPOParams: f_alpha_divergence_coef"):
        DPOParams(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan"))
    with pytest.raises(ConfigError, match="f_divergence_type"):  # nca_pair reads each reward on its own
        load_config(None, ["method.name=nca_pair", "method.f_divergence_type=forward_kl"])
    with pytest.raises(ConfigError, match=r"f_divergence_type applies to \['dpo'\] but \['nca_pair'\]"):
        load_config(None, ["method.name=[dpo, nca_pair]", "method.f_divergence_type=js_divergence"])
    cfg = load_config(None, ["method.name=[dpo, sft]", "method.f_divergence_type=js_divergence"])
    assert cfg.method.params.parts[0][2].f_divergence_type == "js_divergence"


def test_wpo_weighs_the_nll_as_trl_weighs_its_sft_term():
    """[dpo, sft] with wpo_weighting: w·dpo + 0.3·w·NLL; dpo with sft_weight=0.3 is the same sum in one
    row; sft alone is w·NLL. On DPO's WPO example the weights are (0.5, 1.20464010)."""
    inputs = LossInputs(**wpo_inputs())
    w = wpo_weights(inputs, "dpo")
    assert w.tolist() == pytest.approx([0.5, 1.20464010], abs=1e-8)
    plain = METHODS["dpo"].loss_fn(inputs, DPOParams()).losses
    nll = chosen_nll(inputs)
    combined = get_method(["dpo", "sft"])
    params = combined.params_cls(wpo_weighting=True, weights=[1.0, 0.3])
    got = combined.loss_fn(inputs, params).losses
    torch.testing.assert_close(got, w * (plain + 0.3 * nll), rtol=0, atol=1e-12)
    one_row = METHODS["dpo"].loss_fn(inputs, DPOParams(wpo_weighting=True, sft_weight=0.3)).losses
    torch.testing.assert_close(one_row, got, rtol=0, atol=1e-12)
    sft = METHODS["sft"].loss_fn(inputs, METHODS["sft"].params_cls(wpo_weighting=True))
    torch.testing.assert_close(sft.losses, w * nll, rtol=0, atol=1e-12)
    assert get_method("sft", METHODS["sft"].params_cls(wpo_weighting=True)).needs_sq_mass


def _checkpoint(tmp_path, config):
    from sparsepo.checkpoint import META

    tag = tmp_path / "step-00000002"
    tag.mkdir(exist_ok=True)
    (tag / META).write_text(json.dumps({"step": 2, "samples": 8, "world_size": 1, "data": "d", "config": config}))
    return tag


BATCH = ["train.micro_batch_size=8", "train.grad_accum=1"]


def test_a_wpo_checkpoint_from_before_wpo_clip_resumes_only_capped(tmp_path):
    """An older sparsepo capped WPO's weight at 1 and wrote no wpo_clip: its WPO checkpoint resumes with
    wpo_clip=1.0 and is refused at the new default (no cap), the error saying what the absence meant.
    A DPO checkpoint without WPO resumes at the default, where the cap never acts."""
    from sparsepo.checkpoint import CheckpointError, check_compatible

    old = to_dict(load_config(None, ["method.name=dpo", "method.wpo_weighting=true", "method.wpo_clip=1.0", *BATCH]))
    del old["method"]["wpo_clip"]
    tag = _checkpoint(tmp_path, old)
    capped = load_config(None, ["method.name=dpo", "method.wpo_weighting=true", "method.wpo_clip=1.0", *BATCH])
    assert check_compatible(tag, capped, data_fingerprint="d", world_size=1)["step"] == 2
    now = load_config(None, ["method.name=dpo", "method.wpo_weighting=true", *BATCH])
    with pytest.raises(CheckpointError, match=r"method\.wpo_clip: absent \(then 1\.0\) -> None"):
        check_compatible(tag, now, data_fingerprint="d", world_size=1)
    plain = to_dict(load_config(None, ["method.name=dpo", *BATCH]))
    del plain["method"]["wpo_clip"]
    tag = _checkpoint(tmp_path, plain)
    assert check_compatible(tag, load_config(None, ["method.name=dpo", *BATCH]), data_fingerprint="d",
                            world_size=1)["step"] == 2


def test_a_cpo_checkpoint_with_alpha_resumes_as_cpo_alpha(tmp_path):
    """CPO's NLL weight was `alpha`; it is TRL's `cpo_alpha` now (AlphaPO's α is another thing). An old
    CPO checkpoint's alpha is read as cpo_alpha; the old key in a new config is refused naming the new one."""
    from sparsepo.checkpoint import CheckpointError, check_compatible

    old = to_dict(load_config(None, ["method.name=cpo", "method.cpo_alpha=0.5", *BATCH]))
    old["method"]["alpha"] = old["method"].pop("cpo_alpha")
    tag = _checkpoint(tmp_path, old)
    same = load_config(None, ["method.name=cpo", "method.cpo_alpha=0.5", *BATCH])
    assert check_compatible(tag, same, data_fingerprint="d", world_size=1)["step"] == 2
    with pytest.raises(CheckpointError, match=r"method\.cpo_alpha: 0\.5 -> 1\.0"):
        check_compatible(tag, load_config(None, ["method.name=cpo", *BATCH]), data_fingerprint="d", world_size=1)
    with pytest.raises(ConfigError, match="cpo_alpha"):
        load_config(None, ["method.name=cpo", "method.alpha=0.5"])


@pytest.mark.parametrize("cls,kwargs,word", [
    (CPOMarginParams, {"beta": 0.0}, "beta"), (CPOMarginParams, {"cpo_alpha": -1.0}, "cpo_alpha"),
    (AlphaPOParams, {"alpha": float("inf")}, "alpha"), (AlphaPOParams, {"gamma": -0.1}, "gamma"),
    (AlphaPOParams, {"label_smoothing": 0.5}, "label_smoothing"), (DPOParams, {"wpo_clip": 0.0}, "wpo_clip"),
])
def test_params_refuse_bad_values(cls, kwargs, word):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {word}"):
        cls(**kwargs)


def test_hinge_and_ipo_variants_take_no_label_smoothing():
    """TRL ignores label_smoothing for CPO's hinge and ipo (with a warning); here the key is unknown."""
    for name in ("cpo_hinge", "cpo_ipo"):
        with pytest.raises(ConfigError, match="label_smoothing"):
            load_config(None, [f"method.name={name}", "method.label_smoothing=0.1"])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("stale", [["generation.staleness=1"], ["generation.every_steps=2"]])
def test_spo_sampled_token_estimators_run_on_stale_samples(estimator, stale):
    """k1/k3 on a round drawn by an older policy load (weighted by πθ/π_old: tests/test_spo_kl.py), alone
    and in a combination holding spo."""
    spo = ["method.name=spo", "reference.mode=inline", f"method.kl_estimator={estimator}"]
    assert load_config(None, [*spo, *stale]).method.params.kl_estimator == estimator
    load_config(None, ["method.name=[spo, sft]", "reference.mode=inline", f"method.kl_estimator={estimator}", *stale])


def test_k1_on_a_stale_round_is_biased_by_hand():
    """Why the ratio: one position, two tokens, πθ = (0.5, 0.5), π_old = (0.9, 0.1), πref = (0.8, 0.2).
    KL_t = 0.5·log(0.5/0.8) + 0.5·log(0.5/0.2) = 0.5·(−0.47000363 + 0.91629073) = 0.22314355;
    k1 on y ~ π_old: E = 0.9·(−0.47000363) + 0.1·0.91629073 = −0.33137419 (the wrong sign); with the
    ratio πθ/π_old: 0.9·(5/9)·(−0.47000363) + 0.1·5·0.91629073 = 0.22314355 again."""
    from sparsepo.losses.kl import k1

    pol, old, ref = t([0.5, 0.5]).log(), t([0.9, 0.1]), t([0.8, 0.2]).log()
    per_token = k1(pol, ref)
    exact = float((pol.exp() * per_token).sum())
    assert exact == pytest.approx(0.22314355, abs=1e-8)
    assert float((old * per_token).sum()) == pytest.approx(-0.33137419, abs=1e-8)
    assert float((old * (pol.exp() / old) * per_token).sum()) == pytest.approx(exact, abs=1e-12)
