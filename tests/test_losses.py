"""The losses: hand-worked values of DPO, IPO and SimPO; the checks every row of the table gets
(float64 gradcheck, sign, detach, length normalisation, reading exactly the fields its flags
promise); and the table's flags and refusals. Per-family tests: tests/test_losses_<family>.py.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_losses*.py -q
"""

import dataclasses
import math

import pytest
import torch

from sparsepo.losses import (
    BASE_FIELDS,
    FLAG_FIELDS,
    METHODS,
    SITUATIONAL_FIELDS,
    SUBSTITUTE_FIELDS,
    BCOParams,
    DPOParams,
    FPOParams,
    IPOParams,
    LossInputs,
    SePOParams,
    SimPOParams,
    SPOParams,
    TDPOParams,
    dpo_loss,
    get_method,
    ipo_loss,
    simpo_loss,
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


def test_ipo_sequence_reading_by_hand():
    """h="sequence" (the paper's Eq. 17): h = (−10 − (−12)) − (−15 − (−13)) = 2 + 2 = 4;
    loss = (4 − 5)² = 1; rewards = 0.1·2 = 0.2 and 0.1·(−2) = −0.2 (not divided by |y|)."""
    inputs = LossInputs(policy_chosen_logps=t([-10]), policy_rejected_logps=t([-15]),
                        ref_chosen_logps=t([-12]), ref_rejected_logps=t([-13]),
                        chosen_mask=t([[0, 1, 1, 0, 0]]), rejected_mask=t([[0, 1, 1, 1, 1]]))
    out = ipo_loss(inputs, IPOParams(beta=0.1, h="sequence"))
    assert out.losses.item() == pytest.approx(1.0, abs=TOL)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.2, -0.2), abs=TOL)
    with pytest.raises(ValueError, match="IPOParams: h must be one of"):
        IPOParams(h="sum")


def test_simpo_by_hand():
    """β=2, γ=0.5. log πθ(yw) = −6 over |yw|=3 -> r = 2·(−2) = −4; log πθ(yl) = −12 over |yl|=4 -> r = −6.
    z = −4 − (−6) − 0.5 = 1.5; loss = log(1 + e^{−1.5}) = log(1.22313016) = 0.20141328."""
    inputs = LossInputs(policy_chosen_logps=t([-6]), policy_rejected_logps=t([-12]),
                        chosen_mask=t([[0, 1, 1, 1, 0]]), rejected_mask=t([[0, 1, 1, 1, 1]]))
    out = simpo_loss(inputs, SimPOParams(beta=2.0, gamma=0.5))
    assert out.losses.item() == pytest.approx(0.20141328, abs=1e-8)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-4.0, -6.0), abs=TOL)


def test_hand_examples_agree_with_the_softplus_formula():
    """Guards the quoted constants of the hand examples (here and in test_losses_token_level.py) against
    typos: each is log(1 + e^{−z}) of the z worked out, and κ, λ are the two directions of the sparse
    KL used in the TDPO and SPO examples."""
    assert 0.25 * LN2 + 0.375 * math.log(1.5) == pytest.approx(0.32533621, abs=1e-8)
    assert 0.75 * LN2 - 0.25 * math.log(1.5) == pytest.approx(0.41849411, abs=1e-8)
    for z, value in [(0.4, 0.51301525), (1.5, 0.20141328), (0.36746638, 0.52619881), (0.38373319, 0.51957515),
                     (0.197, 0.59949048), (0.2, 0.59813887), (2.0, 0.12692801), (1.0, 0.31326169),
                     (0.46666667, 0.48679258)]:
        assert softplus_neg(z) == pytest.approx(value, abs=1e-8)


# --------------------------------------------------------------------------------------------
# gradients


# Inputs behind a stop-gradient: the value depends on them but the gradient is zero by design, so
# finite differences cannot agree there (tested separately in test_losses_token_level.py).
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


@pytest.mark.parametrize("name", ["simpo", "sepo", "spo", "cpo", "cpo_hinge", "cpo_ipo", "alphapo", "orpo", "sft"])
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
    assert promised | set(SUBSTITUTE_FIELDS.values()) | set(SITUATIONAL_FIELDS) == optional
    assert set(SUBSTITUTE_FIELDS) <= promised and set(SITUATIONAL_FIELDS.values()) <= set(FLAG_FIELDS)


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
                                                   "sppo_hard", "aot", "aot_pair", "aot_unpaired", "apo_zero", "apo_down",
                                                   "discopop")},
        "sigmoid_norm": ("needs_reference", "length_normalised"),
        "cpo": (), "cpo_hinge": (), "cpo_ipo": ("length_normalised",), "alphapo": ("length_normalised",),
        "orpo": ("length_normalised",),
        "sft": ("length_normalised",),
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
    (SPOParams, {"alpha": 0.0}, "alpha"), (SPOParams, {"kl_estimator": "k2"}, "kl_estimator"),
    (SPOParams, {"kl_support": "reference"}, "kl_support"), (SPOParams, {"kl_reduction": "sum"}, "kl_reduction"),
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
