"""The knobs across the rows on sequence log-ratios (`sparsepo/losses/knobs.py`): which row takes which,
that each one off is the row bit for bit and on is the row on LD-DPO's sums / times WPO's weight /
plus RPO's NLL, hand-worked values on rows other than DPO, float64 gradcheck, stop-gradients, the
flags a knob adds, and the refusals. DPO's own knob tests: test_losses_dpo_knobs.py.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_losses_pair_knobs.py
"""

import dataclasses

import pytest
import torch

from loss_fields import PARAMS, TOL, inputs_for, ld_inputs, optional_fields, random_fields, wpo_inputs
from sparsepo.config import ConfigError, config_from_dict
from sparsepo.losses import METHODS, IPOParams, LossInputs, chosen_nll, get_method
from sparsepo.losses.knobs import CDPOKnob, FDivKnob, LDKnob, SFTKnob, WPOKnob, ld_sequence_logps, wpo_weights

pytestmark = pytest.mark.unit
ALL = {"sft_weight", "ld_alpha", "wpo_weighting"}
FDIV = ALL | {"f_divergence_type"}
AOT = {"sft_weight", "ld_alpha", "label_smoothing"}
TAKES = {"dpo": FDIV | {"label_smoothing"}, "ipo": FDIV, "hinge": FDIV, "robust": FDIV, "exo_pair": FDIV,
         "nca_pair": ALL, "bco_pair": ALL, "sppo_hard": ALL, "apo_zero": ALL, "apo_down": ALL, "discopop": FDIV,
         "aot": AOT, "aot_pair": AOT, "aot_unpaired": AOT,
         "sigmoid_norm": {"sft_weight", "wpo_weighting", "f_divergence_type"}, "sft": {"wpo_weighting"}}
"""What each row takes; every other row takes none (robust's and exo_pair's own ε are not cDPO's;
f_divergence_type on the rows TRL 1.16 allows it on; sft only WPO's weight, as TRL weighs its sft term)."""
MIXIN = {"sft_weight": SFTKnob, "ld_alpha": LDKnob, "wpo_weighting": WPOKnob, "label_smoothing": CDPOKnob,
         "f_divergence_type": FDivKnob}
ROWS = [name for name in METHODS if name not in ("dpo", "sft") and name in TAKES]
LD_ROWS = [n for n in ROWS if "ld_alpha" in TAKES[n]]
WPO_ROWS = [n for n in ROWS if "wpo_weighting" in TAKES[n]]
SEQ = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def base(name):
    """The row's default params; IPO reads sequence sums (h=sequence), the reading that takes ld_alpha."""
    return IPOParams(h="sequence") if name == "ipo" else PARAMS[name]


def run(name, params, fields, **override):
    """The row's loss on exactly the inputs its resolved row (with the knobs' flags) promises."""
    return METHODS[name].loss_fn(inputs_for(get_method(name, params), fields, **override), params)


def test_which_rows_take_which_knob():
    """The table in docs/methods.md, "DPO's knobs": an accidental mixin (or a lost one) fails here."""
    for name, spec in METHODS.items():
        params = spec.params_cls()
        taken = {key for key, mixin in MIXIN.items() if isinstance(params, mixin)}
        assert taken == TAKES.get(name, set()), name
        assert taken <= {f.name for f in dataclasses.fields(params)}, name


@pytest.mark.parametrize("name", ROWS)
def test_knobs_off_are_the_row_bit_for_bit(name):
    """ld_alpha=1, wpo_weighting=false, sft_weight=0: the same row object (nothing extra computed or
    served), the same losses, rewards and metrics to the bit, on inputs holding no token field."""
    off = {k: v for k, v in (("ld_alpha", 1.0), ("wpo_weighting", False), ("sft_weight", 0.0)) if k in TAKES[name]}
    params = dataclasses.replace(base(name), **off)
    assert get_method(name, params) is METHODS[name]
    inputs = inputs_for(METHODS[name], random_fields(seed=30))
    got, want = METHODS[name].loss_fn(inputs, params), METHODS[name].loss_fn(inputs, base(name))
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.metrics.keys() == want.metrics.keys()


@pytest.mark.parametrize("name", LD_ROWS)
def test_ld_is_the_row_on_the_desensitised_sums(name):
    """ld_alpha=0.3 is the row fed LD-DPO's sums (rewards included), bit for bit; the random pairs
    have unequal lengths, so it differs from the row; on pairs of equal length it is the row."""
    fields = random_fields(seed=31)
    params = dataclasses.replace(base(name), ld_alpha=0.3)
    got = run(name, params, fields)
    sums = dict(zip(SEQ, ld_sequence_logps(LossInputs(**fields), 0.3, name)))
    want = METHODS[name].loss_fn(inputs_for(METHODS[name], fields, **sums), base(name))
    assert torch.equal(got.losses, want.losses) and torch.equal(got.chosen_rewards, want.chosen_rewards)
    assert not torch.allclose(got.losses, run(name, base(name), fields).losses)
    equal = dict(fields, rejected_mask=fields["chosen_mask"])
    assert torch.equal(run(name, params, equal).losses, run(name, base(name), equal).losses)


@pytest.mark.parametrize("name", WPO_ROWS)
def test_wpo_weighs_the_row(name):
    """wpo_weighting: the row's losses times the detached pair weight, rewards unchanged, the weight's
    batch mean logged; the random weights are not all 1, so the test sees them."""
    fields = random_fields(seed=32)
    params = dataclasses.replace(base(name), wpo_weighting=True)
    got, plain = run(name, params, fields), run(name, base(name), fields)
    weights = wpo_weights(LossInputs(**fields), name)
    assert not torch.all(weights == 1)
    assert torch.equal(got.losses, weights * plain.losses)
    assert torch.equal(got.chosen_rewards, plain.chosen_rewards)
    assert got.metrics["wpo_weight"] == weights.mean()


@pytest.mark.parametrize("name", ROWS)
def test_all_knobs_on_compose_in_one_order(name):
    """w·(the row on LD's sums + α·NLL of the plain chosen log-prob): WPO weighs the NLL too (TRL 1.16's
    [sigmoid, sft] weighs both), and the NLL is the response's own (not desensitised)."""
    fields = random_fields(seed=33)
    on = {k: v for k, v in (("ld_alpha", 0.4), ("wpo_weighting", True), ("sft_weight", 0.7)) if k in TAKES[name]}
    got = run(name, dataclasses.replace(base(name), **on), fields)
    full = LossInputs(**fields)
    sums = dict(zip(SEQ, ld_sequence_logps(full, 0.4, name))) if "ld_alpha" in on else {}
    row = METHODS[name].loss_fn(inputs_for(METHODS[name], fields, **sums), base(name)).losses
    weight = wpo_weights(full, name) if "wpo_weighting" in on else 1.0
    torch.testing.assert_close(got.losses, weight * (row + 0.7 * chosen_nll(full)), rtol=0, atol=1e-12)
    assert got.metrics["nll"] == chosen_nll(full).mean()


def test_ld_hinge_and_ipo_by_hand():
    """DPO's LD example (test_losses_dpo_knobs.test_ld_dpo_by_hand), β=0.1, α=0.5: desensitised
    a = (−2, 1), b = (2, −1); plain a = (−3, 1), b = (2, −2).
    hinge relu(1 − β·(a − b)): LD (1 + 0.4, 1 − 0.2) = (1.4, 0.8); plain (1.5, 0.7).
    IPO, h=sequence, (a − b − 1/(2β))² = (a − b − 5)²: LD (−9)², (−3)² = (81, 9); plain (100, 4).
    Rewards β·a, β·b: (−0.2, 0.1) and (0.2, −0.1), as DPO's."""
    inputs = LossInputs(**ld_inputs())
    hinge = METHODS["hinge"].loss_fn(inputs, dataclasses.replace(PARAMS["hinge"], ld_alpha=0.5))
    assert hinge.losses.tolist() == pytest.approx([1.4, 0.8], abs=TOL)
    assert hinge.chosen_rewards.tolist() == pytest.approx([-0.2, 0.1], abs=TOL)
    assert hinge.rejected_rewards.tolist() == pytest.approx([0.2, -0.1], abs=TOL)
    assert METHODS["hinge"].loss_fn(inputs, PARAMS["hinge"]).losses.tolist() == pytest.approx([1.5, 0.7], abs=TOL)
    ipo = METHODS["ipo"].loss_fn(inputs, IPOParams(h="sequence", ld_alpha=0.5))
    assert ipo.losses.tolist() == pytest.approx([81.0, 9.0], abs=1e-8)
    assert METHODS["ipo"].loss_fn(inputs, IPOParams(h="sequence")).losses.tolist() == pytest.approx([100.0, 4.0],
                                                                                                    abs=1e-8)


def test_wpo_and_sft_on_sppo_hard_by_hand():
    """DPO's WPO example (weights 0.5 and 1.20464010): a = (2, 0), b = (−2, 0), β=0.1 so targets ±5.
    SPPO (a − 5)² + (b + 5)²: (9 + 9, 25 + 25) = (18, 50); weighted (9, 60.23200476); wpo_weight 0.85232005.
    sft_weight 0.1: NLL −log πθ(yw)/|yw| = (10/2, 5/1) = (5, 5), so + 0.5 each, weighted too:
    (0.5·18.5, 1.20464010·50.5) = (9.25, 60.83432481). wpo_clip=1: (9.25, 50.5)."""
    inputs = LossInputs(**wpo_inputs())
    sppo = METHODS["sppo_hard"]
    out = sppo.loss_fn(inputs, dataclasses.replace(PARAMS["sppo_hard"], wpo_weighting=True))
    assert out.losses.tolist() == pytest.approx([9.0, 60.23200476], abs=1e-8)
    assert out.metrics["wpo_weight"].item() == pytest.approx(0.85232005, abs=1e-8)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.0], abs=TOL)
    both = sppo.loss_fn(inputs, dataclasses.replace(PARAMS["sppo_hard"], wpo_weighting=True, sft_weight=0.1))
    assert both.losses.tolist() == pytest.approx([9.25, 60.83432481], abs=1e-8)
    capped = sppo.loss_fn(inputs, dataclasses.replace(PARAMS["sppo_hard"], wpo_weighting=True, sft_weight=0.1,
                                                      wpo_clip=1.0))
    assert capped.losses.tolist() == pytest.approx([9.25, 50.5], abs=1e-8)
    assert both.metrics["nll"].item() == pytest.approx(5.0, abs=TOL)


@pytest.mark.parametrize("name,knobs", [("nca_pair", {"ld_alpha": 0.3, "sft_weight": 0.5}),
                                        ("bco_pair", {"ld_alpha": 0.6, "wpo_weighting": True, "sft_weight": 0.2,
                                                     "baseline": "none"}),
                                        ("aot", {"ld_alpha": 0.2}), ("ipo", {"ld_alpha": 0.5, "wpo_weighting": True})])
def test_gradcheck_in_float64(name, knobs):
    """Gradients wrt every policy input the loss differentiates; with WPO the weight's inputs are held
    (they sit under stop-gradient, so a finite difference through them would not match by design), and
    BCO's δ is 0 (its batch mean is a stop-gradient too)."""
    params = dataclasses.replace(base(name), **knobs)
    spec = get_method(name, params)
    fields = random_fields(seed=34)
    held = ("policy_chosen_log_sq_mass", "policy_rejected_log_sq_mass")
    if knobs.get("wpo_weighting"):
        held += ("policy_chosen_token_logps", "policy_rejected_token_logps")
    names = [n for n in spec.required_fields if n.startswith("policy_") and n not in held]
    assert "policy_chosen_token_logps" in names or knobs.get("wpo_weighting")  # LD's token path is checked
    leaves = tuple(fields[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(
        lambda *xs: spec.loss_fn(inputs_for(spec, fields, **dict(zip(names, xs))), params).losses, leaves)


@pytest.mark.parametrize("name", ["discopop", "apo_down", "sigmoid_norm"])
def test_wpo_weights_carry_no_gradient(name):
    """The weight's inputs get no gradient; the sequence log-probs get w times the row's gradient."""
    fields = random_fields(seed=35)
    for side in ("chosen", "rejected"):  # every token below its collision mass: all weights < 1
        fields[f"policy_{side}_log_sq_mass"] = fields[f"policy_{side}_token_logps"] + 0.4
    params = dataclasses.replace(base(name), wpo_weighting=True)
    spec = get_method(name, params)
    leaves = {n: fields[n].clone().requires_grad_(True) for n in spec.required_fields if n.startswith("policy_")}
    spec.loss_fn(inputs_for(spec, fields, **leaves), params).losses.sum().backward()
    for field in ("policy_chosen_token_logps", "policy_rejected_token_logps", "policy_chosen_log_sq_mass",
                  "policy_rejected_log_sq_mass"):
        assert leaves[field].grad is None, field
    plain = {n: fields[n].clone().requires_grad_(True) for n in SEQ[:2]}
    spec.loss_fn(inputs_for(METHODS[name], fields, **plain), base(name)).losses.sum().backward()
    weights = wpo_weights(LossInputs(**fields), name)
    assert not weights.requires_grad and torch.all(weights < 1)
    for field, leaf in plain.items():
        torch.testing.assert_close(leaves[field].grad, weights * leaf.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ROWS)
def test_the_resolved_row_reads_exactly_what_its_flags_promise(name):
    """Every knob the row takes on: each optional field its resolved row promises is read (None is
    refused naming it), and fields it does not promise change nothing."""
    on = {k: v for k, v in (("ld_alpha", 0.5), ("wpo_weighting", True), ("sft_weight", 0.1)) if k in TAKES[name]}
    params = dataclasses.replace(base(name), **on)
    spec = get_method(name, params)
    assert spec.needs_ref_token_logps == ("ld_alpha" in on) and spec.needs_sq_mass == ("wpo_weighting" in on)
    assert spec.reference_outputs == (("seq_logps", "token_logps") if "ld_alpha" in on else ("seq_logps",))
    fields = random_fields(seed=36)
    for field in optional_fields(spec):
        with pytest.raises(ValueError, match=rf"'{name}'.*{field}"):
            spec.loss_fn(inputs_for(spec, fields, **{field: None}), params)
    other = random_fields(seed=37)
    extra = {n: other[n] for n in other if n not in spec.required_fields}
    assert torch.equal(spec.loss_fn(inputs_for(spec, fields), params).losses,
                       spec.loss_fn(inputs_for(spec, fields, **extra), params).losses)


def test_a_combination_shares_a_knob_with_the_components_that_take_it():
    """[dpo, aot] with wpo_weighting: DPO is weighted, AOT (which does not take it) is not; the row
    asks for log Σp². [hinge, sft] with ld_alpha: the reference serves token log-probs."""
    spec = get_method(["dpo", "aot"])
    params = spec.params_cls(wpo_weighting=True)
    (_, _, dpo_p), (_, _, aot_p) = params.parts
    assert dpo_p.wpo_weighting and not hasattr(aot_p, "wpo_weighting")
    assert get_method(["dpo", "aot"], params).needs_sq_mass
    hinge_sft = get_method(["hinge", "sft"])
    assert get_method(["hinge", "sft"], hinge_sft.params_cls(ld_alpha=0.5)).reference_outputs == ("seq_logps",
                                                                                                 "token_logps")


@pytest.mark.parametrize("name", ROWS)
def test_every_row_checks_its_knobs(name):
    """Out of range on any row that takes the knob: refused naming the row's params and the key (each
    row's __post_init__ reaches knobs.check_knobs)."""
    owner = type(PARAMS[name]).__name__
    bad = {"sft_weight": -0.1, "ld_alpha": 1.5, "wpo_weighting": 1, "label_smoothing": 0.5,
           "f_divergence_type": "kl"}
    for key in sorted(TAKES[name]):
        with pytest.raises(ValueError, match=rf"{owner}: {key}"):
            dataclasses.replace(base(name), **{key: bad[key]})


@pytest.mark.parametrize("method,key,value,word", [
    ("aot", "wpo_weighting", True, "unknown key 'method.wpo_weighting'"),
    ("aot_pair", "wpo_weighting", True, "unknown key 'method.wpo_weighting'"),
    ("sigmoid_norm", "ld_alpha", 0.5, "unknown key 'method.ld_alpha'"),
    ("sigmoid_norm", "label_smoothing", 0.1, "unknown key 'method.label_smoothing'"),
    ("hinge", "label_smoothing", 0.1, "unknown key 'method.label_smoothing'"),
    ("ipo", "ld_alpha", 0.5, "ld_alpha=0.5 needs h=sequence"),
    ("nca_pair", "ld_alpha", 1.5, "ld_alpha must be"), ("bco_pair", "sft_weight", -1.0, "sft_weight must be")])
def test_config_refuses_a_knob_naming_the_key(method, key, value, word):
    """A row that does not take the knob (an unknown key of its method section; IPO's default
    h=token_mean by value), or a value out of range."""
    with pytest.raises(ConfigError, match=word):
        config_from_dict({"method": {"name": method, key: value}})
    accepted = config_from_dict({"method": {"name": "ipo", "h": "sequence", "ld_alpha": 0.5, "wpo_weighting": True}})
    assert accepted.method.params == IPOParams(h="sequence", ld_alpha=0.5, wpo_weighting=True)


def test_config_keys_document_the_inherited_knobs():
    """`sparsepo config keys` reads field docstrings from source: a knob's comes from its mixin, the
    row's own fields keep theirs."""
    from sparsepo.config.keys import field_docs
    from sparsepo.losses import HingeParams

    docs = field_docs(HingeParams)
    assert docs["ld_alpha"].startswith("α of LD-DPO") and docs["wpo_weighting"].startswith("WPO")
    assert docs["sft_weight"].startswith("α of RPO") and docs["beta"].startswith("β: the hinge")
