"""Combined methods (`method.name: [dpo, sft]`, `method.weights: [1.0, 0.1]`): the weighted sum, the
flags it promises, its params and their config round trip, and its refusals.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses_combined.py -q
"""

import dataclasses

import pytest
import torch

from loss_fields import TOL, inputs_for, optional_fields, policy_fields, random_fields, t
from sparsepo.losses import METHODS, CPOParams, DPOParams, LossInputs, cpo_loss, dpo_loss, get_method


def dpo_pair():
    """DPO's hand pair (z = 0.4 at β=0.1, ℓ = 0.51301525) with |yw| = 3: NLL = 10/3."""
    return LossInputs(policy_chosen_logps=t([-10.0]), policy_rejected_logps=t([-15.0]),
                      ref_chosen_logps=t([-12.0]), ref_rejected_logps=t([-13.0]),
                      chosen_mask=t([[0, 1, 1, 1]]), rejected_mask=t([[0, 1, 1, 0]]))


def test_dpo_plus_sft_by_hand():
    """weights (1, 0.1): 0.51301525 + 0.1·3.33333333 = 0.84634859. Rewards, margin, accuracy are DPO's
    (0.2, −0.2, 0.4, 1); loss_dpo = 0.51301525, loss_sft = 3.33333333; sft's own margin is its per-token
    average log-probs −10/3 − (−15/2) = 4.16666667."""
    spec = get_method(["dpo", "sft"])
    out = spec.loss_fn(dpo_pair(), spec.params_cls(beta=0.1, weights=[1.0, 0.1]))
    assert out.losses.item() == pytest.approx(0.84634859, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.2, -0.2), abs=TOL)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert (m["margin"], m["accuracy"]) == pytest.approx((0.4, 1.0), abs=TOL)
    assert (m["loss_dpo"], m["loss_sft"]) == pytest.approx((0.51301525, 10 / 3), abs=1e-8)
    assert m["sft_margin"] == pytest.approx(-10 / 3 + 7.5, abs=TOL)


def test_dpo_plus_weighted_sft_is_dpo_with_sft_weight():
    """[dpo, sft] with weights (1, α) is DPO's RPO knob sft_weight=α, pair by pair."""
    fields = random_fields(seed=40)
    spec = get_method(["dpo", "sft"])
    combined = spec.loss_fn(inputs_for(spec, fields), spec.params_cls(weights=[1.0, 0.3]))
    rpo = dpo_loss(inputs_for(METHODS["dpo"], fields), DPOParams(sft_weight=0.3))
    torch.testing.assert_close(combined.losses, rpo.losses, rtol=0, atol=1e-14)


def test_flags_are_the_union_and_each_component_gets_what_it_reads():
    spec = get_method(["simpo", "dpo", "sepo"])
    assert spec.name == "simpo+dpo+sepo" and spec.needs_reference and spec.needs_oracle_scores
    assert spec.needs_token_logps and not spec.needs_sae_features
    assert spec.reference_outputs == ("seq_logps", "oracle_scores")
    assert spec.length_normalised  # the first component's (simpo): its rewards are the row's
    assert get_method(["dpo", "sft"]).reference_outputs == ("seq_logps",)
    assert get_method(["cpo", "orpo"]).reference_outputs == ()


@pytest.mark.parametrize("names", [["dpo", "sft"], ["simpo", "dpo", "sepo"], ["cpo", "tdpo1"]])
def test_each_promised_field_is_read_and_unpromised_ones_ignored(names):
    spec = get_method(names)
    fields, other = random_fields(seed=41), random_fields(seed=42)
    params = spec.params_cls()
    for field in optional_fields(spec):
        with pytest.raises(ValueError, match=field):
            spec.loss_fn(inputs_for(spec, fields, **{field: None}), params)
    extra = {n: other[n] for n in other if n not in spec.required_fields}
    base = spec.loss_fn(inputs_for(spec, fields), params)
    assert torch.equal(base.losses, spec.loss_fn(inputs_for(spec, fields, **extra), params).losses)


def test_gradcheck_and_detached_rewards():
    spec = get_method(["dpo", "sft", "cpo"])
    fields = random_fields(seed=43)
    names = policy_fields(spec)
    leaves = tuple(fields[n].clone().requires_grad_(True) for n in names)
    params = spec.params_cls(weights=[1.0, 0.5, 2.0])

    def losses(*xs):
        return spec.loss_fn(inputs_for(spec, fields, **dict(zip(names, xs))), params).losses

    assert torch.autograd.gradcheck(losses, leaves)
    out = spec.loss_fn(inputs_for(spec, fields, **dict(zip(names, leaves))), params)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())


def test_shared_keys_are_shared_and_each_component_validates():
    """dpo and cpo both have beta and label_smoothing: one value for both; cpo's cpo_alpha is its own."""
    spec = get_method(["dpo", "cpo"])
    params = spec.params_cls(beta=0.2, cpo_alpha=0.5)
    (_, _, dpo_p), (_, _, cpo_p) = params.parts
    assert dpo_p == DPOParams(beta=0.2) and cpo_p == CPOParams(beta=0.2, cpo_alpha=0.5)
    assert params.weights == [1.0, 1.0]
    fields = random_fields(seed=44)
    out = spec.loss_fn(inputs_for(spec, fields), params)
    expected = (dpo_loss(inputs_for(METHODS["dpo"], fields), dpo_p).losses
                + cpo_loss(inputs_for(METHODS["cpo"], fields), cpo_p).losses)
    torch.testing.assert_close(out.losses, expected, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="CPOParams: cpo_alpha"):
        spec.params_cls(cpo_alpha=-1.0)
    assert get_method(("dpo", "cpo")) is spec  # one params class per combination


@pytest.mark.parametrize("weights,word", [([1.0], "list of 2"), ([1.0, -0.1], ">= 0"), ([0, 0], "not all 0"),
                                          ("1,2", "list of 2"), ([True, 1.0], "list of 2")])
def test_weights_are_refused_unless_one_nonnegative_number_per_method(weights, word):
    with pytest.raises(ValueError, match=rf"DpoPlusSftParams: weights.*{word}"):
        get_method(["dpo", "sft"]).params_cls(weights=weights)


@pytest.mark.parametrize("names,word", [(["dpo"], "two or more"), (["dpo", "dpo"], "two or more"),
                                        (["dpo", "sftt"], "Did you mean 'sft'")])
def test_bad_combinations_are_refused(names, word):
    with pytest.raises(ValueError, match=word):
        get_method(names)


def test_config_round_trip_and_refusals(tmp_path):
    from sparsepo.config import ConfigError, load_config
    from sparsepo.config.load import config_from_dict, save_resolved, to_dict

    cfg = load_config(None, ["method.name=[dpo, sft]", "method.weights=[1.0, 0.1]", "method.beta=0.2"])
    assert cfg.method.name == ["dpo", "sft"] and cfg.method.params.weights == [1.0, 0.1]
    assert dataclasses.asdict(cfg.method.params.parts[0][2]) == dataclasses.asdict(DPOParams(beta=0.2))
    assert config_from_dict(to_dict(cfg)).method.params == cfg.method.params
    resolved = save_resolved(cfg, tmp_path)
    assert load_config(resolved).method.params == cfg.method.params
    with pytest.raises(ConfigError, match=r"unknown key 'method.gamma'.*Valid keys of 'method': .*\bbeta, weights"):
        load_config(None, ["method.name=[dpo, sft]", "method.gamma=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'method.weights'"):  # one method: no weights
        load_config(None, ["method.weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"weights must be a list of 2"):
        load_config(None, ["method.name=[dpo, sft]", "method.weights=[1.0]"])


def test_a_shared_key_with_different_defaults_keeps_each_default_until_set():
    """SimPO's β=2 and DPO's β=0.1 (and SimPO's γ vs SePO's γ): unset, each keeps its own; set, both use it."""
    spec = get_method(["simpo", "dpo"])
    simpo_p, dpo_p = (part[2] for part in spec.params_cls().parts)
    assert (simpo_p.beta, dpo_p.beta) == (2.0, 0.1)
    simpo_p, dpo_p = (part[2] for part in spec.params_cls(beta=0.5).parts)
    assert (simpo_p.beta, dpo_p.beta) == (0.5, 0.5)
    simpo_p, _, sepo_p = (part[2] for part in get_method(["simpo", "dpo", "sepo"]).params_cls().parts)
    assert (simpo_p.gamma, sepo_p.gamma) == (0.5, 1.0)
