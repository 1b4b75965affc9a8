"""DPO's `ld_alpha` (LD-DPO, arXiv 2409.06411) and `wpo_weighting` (WPO, arXiv 2406.11827): hand-worked
values, the reductions to DPO, float64 gradcheck, stop-gradients, the flags the knobs add to the row
(and so what the reference serves and what keys the cache), and their refusals.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_losses_dpo_knobs.py
"""

import math
from types import SimpleNamespace

import pytest
import torch

from loss_fields import F64, PARAMS, TOL, inputs_for, ld_inputs, optional_fields, random_fields, t, wpo_inputs
from sparsepo.config import ConfigError, RunConfig, config_from_dict
from sparsepo.losses import METHODS, DPOParams, LossInputs, dpo_loss, get_method
from sparsepo.losses.common import log_sq_mass, token_logps_from_logits
from sparsepo.losses.inputs import build_loss_inputs
from sparsepo.losses.knobs import excess_masks, ld_sequence_logps, wpo_weights
from sparsepo.logprobs.plain import sq_mass_at_response
from sparsepo.reference_role.offline import cache_settings
from sparsepo.reference.outputs import ReferenceOutputs

pytestmark = pytest.mark.unit
LD = DPOParams(ld_alpha=0.5)
WPO = DPOParams(wpo_weighting=True)


def test_ld_dpo_by_hand():
    """β=0.1, α=0.5; log π̂(y) = Σ_{t≤l_p} + α·Σ_{t>l_p} of the token log-probs, l_p = min(|yw|, |yl|).
    Pair 0: |yw|=3, |yl|=2, l_p=2; the chosen's third token is the excess.
      π̂θ(yw) = −1−2 + 0.5·(−3) = −4.5, π̂ref(yw) = −1−1 + 0.5·(−1) = −2.5, a = −2;
      π̂θ(yl) = −2, π̂ref(yl) = −4, b = 2; z = 0.1·(−2−2) = −0.4; loss = log(1+e^{0.4}) = 0.91301525
      (plain DPO: a = −6+3 = −3, z = −0.5, loss 0.97407698).
    Pair 1: |yw|=2, |yl|=4, l_p=2; the rejected's last two tokens are the excess.
      a = −1+2 = 1; π̂θ(yl) = −2 + 0.5·(−4) = −4, π̂ref(yl) = −2 + 0.5·(−2) = −3, b = −1;
      z = 0.2; loss = log(1+e^{−0.2}) = 0.59813887 (plain DPO: b = −2, z = 0.3, loss 0.55435524).
    Rewards 0.1·a, 0.1·b: (−0.2, 0.1) and (0.2, −0.1)."""
    inputs = LossInputs(**ld_inputs())
    out = dpo_loss(inputs, LD)
    assert out.losses.tolist() == pytest.approx([0.91301525, 0.59813887], abs=1e-8)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.2, 0.1], abs=TOL)
    assert out.rejected_rewards.tolist() == pytest.approx([0.2, -0.1], abs=TOL)
    assert dpo_loss(inputs, DPOParams()).losses.tolist() == pytest.approx([0.97407698, 0.55435524], abs=1e-8)
    ew, el = excess_masks(inputs.chosen_mask, inputs.rejected_mask)
    assert ew.nonzero().tolist() == [[0, 4]] and el.nonzero().tolist() == [[1, 3], [1, 4]]
    # TRL 1.16 logs the desensitised policy log-probs as logps/*: pair 0's π̂θ(yw) = −4.5 and π̂θ(yl) of
    # pair 1 = −4 (above); pair 1's chosen and pair 0's rejected have no excess: their plain sums
    pw, pl = inputs.policy_chosen_logps, inputs.policy_rejected_logps
    assert float(out.metrics["logps/chosen"]) == pytest.approx((-4.5 + float(pw[1])) / 2, abs=TOL)
    assert float(out.metrics["logps/rejected"]) == pytest.approx((float(pl[0]) - 4.0) / 2, abs=TOL)
    assert "logps/chosen" not in dpo_loss(inputs, DPOParams()).metrics


def test_trainer_logs_the_losses_own_logps_under_ld_dpo():
    """`trainer.step_metrics`: the LD-desensitised logps/* from the loss replace the plain sums (TRL's
    values); without LD the plain sums are logged."""
    from sparsepo.trainer import step_metrics

    inputs = LossInputs(**ld_inputs())
    fwd = SimpleNamespace(seq_logps=torch.cat([inputs.policy_chosen_logps, inputs.policy_rejected_logps]),
                          logit_mean=None, entropy=None)
    mask = torch.ones(4, 6)
    ids = torch.zeros(4, 6, dtype=torch.long)
    got = step_metrics(dpo_loss(inputs, LD), fwd, mask, ids)
    assert float(got["logps/chosen"]) == pytest.approx(float(dpo_loss(inputs, LD).metrics["logps/chosen"]))
    assert float(got["logps/chosen"]) != pytest.approx(float(inputs.policy_chosen_logps.mean()))
    plain = step_metrics(dpo_loss(inputs, DPOParams()), fwd, mask, ids)
    assert float(plain["logps/chosen"]) == pytest.approx(float(inputs.policy_chosen_logps.mean()))


def test_ld_alpha_one_is_dpo_bit_for_bit():
    """α=1: the desensitised sums are the sequence sums exactly, and DPOParams(ld_alpha=1) is plain
    DPO (reading no token field: the inputs below have none)."""
    fields = ld_inputs()
    got = ld_sequence_logps(LossInputs(**fields), 1.0, "dpo")
    for value, key in zip(got, ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")):
        assert torch.equal(value, fields[key]), key
    plain = {k: v for k, v in fields.items() if "token" not in k}
    assert torch.equal(dpo_loss(LossInputs(**plain), DPOParams(ld_alpha=1.0)).losses,
                       dpo_loss(LossInputs(**plain), DPOParams()).losses)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
def test_ld_on_equal_lengths_is_dpo_and_alpha_only_scales_the_excess(alpha):
    """Equal lengths: no excess, any α is DPO. Unequal: lowering pair 0's excess token moves its loss
    only when α > 0, and never pair 1's."""
    fields = random_fields(seed=20)
    equal = dict(fields, rejected_mask=fields["chosen_mask"])
    spec = get_method("dpo", DPOParams(ld_alpha=alpha))
    torch.testing.assert_close(dpo_loss(inputs_for(spec, equal), DPOParams(ld_alpha=alpha)).losses,
                               dpo_loss(inputs_for(spec, equal), DPOParams()).losses, rtol=0, atol=1e-12)
    ld = ld_inputs()
    moved = dict(ld, policy_chosen_token_logps=ld["policy_chosen_token_logps"].clone(),
                 policy_chosen_logps=ld["policy_chosen_logps"] - t([1.0, 0.0]))
    moved["policy_chosen_token_logps"][0, 4] -= 1.0  # pair 0's excess token
    before = dpo_loss(LossInputs(**ld), DPOParams(ld_alpha=alpha)).losses
    after = dpo_loss(LossInputs(**moved), DPOParams(ld_alpha=alpha)).losses
    assert after[1] == before[1]
    assert (after[0] == before[0]) == (alpha == 0.0)


def test_wpo_by_hand():
    """w(y) = exp(mean_t [log πθ(y_t) − log Σ_v πθ(v)²]); pair weight w(yw)·w(yl), uncapped (TRL 1.16).
    Pair 0: chosen tokens p=0.5 with Σp²=0.5 -> w(yw) = 1; rejected p=0.25, Σp²=0.5 -> w(yl) = 0.5;
      weight 0.5, loss 0.5·log(1+e^{−0.4}) = 0.5·0.51301525 = 0.25650763.
    Pair 1: p=0.9, Σp²=0.82 on both -> (0.9/0.82)² = 1.20464010: loss 1.20464010·log 2 = 0.83499289.
    wpo_weight metric = mean(0.5, 1.20464010) = 0.85232005; rewards are DPO's (0.2, −0.2) and (0, 0).
    wpo_clip=1 (sparsepo's old cap): pair 1 weighs 1, loss log 2 = 0.69314718, metric 0.75."""
    inputs = LossInputs(**wpo_inputs())
    assert wpo_weights(inputs, "dpo").tolist() == pytest.approx([0.5, 1.20464010], abs=1e-8)
    out = dpo_loss(inputs, WPO)
    assert out.losses.tolist() == pytest.approx([0.25650763, 0.83499289], abs=1e-8)
    assert out.metrics["wpo_weight"].item() == pytest.approx(0.85232005, abs=1e-8)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.0], abs=TOL)
    capped = dpo_loss(inputs, DPOParams(wpo_weighting=True, wpo_clip=1.0))
    assert capped.losses.tolist() == pytest.approx([0.25650763, 0.69314718], abs=1e-8)
    assert capped.metrics["wpo_weight"].item() == pytest.approx(0.75, abs=TOL)
    for bad in (0.0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="DPOParams: wpo_clip"):
            DPOParams(wpo_weighting=True, wpo_clip=bad)


@pytest.mark.parametrize("c", [-0.7, -0.2, 0.0, 0.4])
def test_wpo_with_uniform_token_ratios_is_dpo_times_a_constant(c):
    """Every token's log πθ(y_t) − log Σp² equal to c: each pair weighs e^{2c} (min(1, e^{2c}) with
    wpo_clip=1), so the loss is DPO's times that constant."""
    fields = random_fields(seed=21)
    uniform = dict(fields, policy_chosen_log_sq_mass=fields["policy_chosen_token_logps"] - c,
                   policy_rejected_log_sq_mass=fields["policy_rejected_token_logps"] - c)
    spec = get_method("dpo", WPO)
    plain = dpo_loss(inputs_for(spec, uniform), DPOParams()).losses
    got = dpo_loss(inputs_for(spec, uniform), WPO).losses
    torch.testing.assert_close(got, math.exp(2 * c) * plain, rtol=0, atol=1e-12)
    capped = dpo_loss(inputs_for(spec, uniform), DPOParams(wpo_weighting=True, wpo_clip=1.0)).losses
    torch.testing.assert_close(capped, min(1.0, math.exp(2 * c)) * plain, rtol=0, atol=1e-12)


def test_wpo_weight_matches_the_equation_on_a_full_distribution():
    """From logits (1,T,V): position t's two terms come from the same distribution softmax(logits[t−1]);
    checked against a direct loop over probabilities."""
    g = torch.Generator().manual_seed(3)
    logits, ids = torch.randn(2, 5, 4, generator=g, dtype=F64), torch.randint(0, 4, (2, 5), generator=g)
    mask = t([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    tokens = token_logps_from_logits(logits, ids) * mask
    sq = sq_mass_at_response(logits, mask)
    inputs = LossInputs(policy_chosen_logps=tokens[:1].sum(-1), policy_rejected_logps=tokens[1:].sum(-1),
                        chosen_mask=mask[:1], rejected_mask=mask[1:], policy_chosen_token_logps=tokens[:1],
                        policy_rejected_token_logps=tokens[1:], policy_chosen_log_sq_mass=sq[:1],
                        policy_rejected_log_sq_mass=sq[1:])
    log_w = 0.0
    for row in range(2):
        terms = []
        for pos in range(1, 5):
            if mask[row, pos]:
                p = torch.softmax(logits[row, pos - 1], -1).tolist()
                terms.append(math.log(p[ids[row, pos]] / sum(q * q for q in p)))
        log_w += sum(terms) / len(terms)
    assert wpo_weights(inputs, "dpo").item() == pytest.approx(math.exp(min(log_w, 0.0)), rel=1e-12)
    assert log_sq_mass(torch.zeros(3, dtype=F64)).item() == pytest.approx(-math.log(3), abs=1e-15)


@pytest.mark.parametrize("params", [LD, WPO, DPOParams(ld_alpha=0.2, wpo_weighting=True, sft_weight=0.5)],
                         ids=["ld", "wpo", "both+sft"])
def test_gradcheck_in_float64(params):
    """Gradients wrt every policy input the loss differentiates (WPO's weight inputs are held fixed:
    they sit under stop-gradient, so a finite difference through them would not match by design)."""
    spec = get_method("dpo", params)
    fields = random_fields(seed=22)
    held = ("policy_chosen_log_sq_mass", "policy_rejected_log_sq_mass")
    if params.wpo_weighting:  # the token log-probs feed the weight: held too (LD's use of them: the "ld" case)
        held += ("policy_chosen_token_logps", "policy_rejected_token_logps")
    names = [n for n in spec.required_fields if n.startswith("policy_") and n not in held]
    leaves = tuple(fields[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(lambda *xs: dpo_loss(inputs_for(spec, fields, **dict(zip(names, xs))),
                                                         params).losses, leaves)


def test_wpo_weights_carry_no_gradient():
    """The weight's inputs get no gradient; the sequence log-probs get w times DPO's gradient."""
    fields = random_fields(seed=23)
    for side in ("chosen", "rejected"):  # every token below its collision mass: all weights < 1
        fields[f"policy_{side}_log_sq_mass"] = fields[f"policy_{side}_token_logps"] + 0.3 + 0.2 * torch.rand(
            2, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    spec = get_method("dpo", WPO)
    leaves = {n: fields[n].clone().requires_grad_(True) for n in spec.required_fields if n.startswith("policy_")}
    out = dpo_loss(inputs_for(spec, fields, **leaves), WPO)
    out.losses.sum().backward()
    for name in ("policy_chosen_token_logps", "policy_rejected_token_logps", "policy_chosen_log_sq_mass",
                 "policy_rejected_log_sq_mass"):
        assert leaves[name].grad is None, name
    plain = {n: fields[n].clone().requires_grad_(True) for n in ("policy_chosen_logps", "policy_rejected_logps")}
    dpo_loss(inputs_for(METHODS["dpo"], fields, **plain), DPOParams()).losses.sum().backward()
    weights = wpo_weights(inputs_for(spec, fields), "dpo")
    assert not weights.requires_grad and torch.all(weights < 1)  # the clamp is not what makes this pass
    for name, leaf in plain.items():
        torch.testing.assert_close(leaves[name].grad, weights * leaf.grad, rtol=0, atol=1e-12)


def test_the_knobs_add_flags_only_when_on():
    """Off (None, 1, False): the row itself, nothing extra computed or served. ld_alpha: the policy's
    and the reference's token log-probs (the reference serves token_logps); wpo: the policy's log Σp²."""
    for off in (None, DPOParams(), DPOParams(ld_alpha=1.0)):
        assert get_method("dpo", off) is METHODS["dpo"]
    ld, wpo = get_method("dpo", LD), get_method("dpo", WPO)
    assert ld.reference_outputs == ("seq_logps", "token_logps") and ld.needs_token_logps and not ld.needs_sq_mass
    assert wpo.reference_outputs == ("seq_logps",) and wpo.needs_token_logps and wpo.needs_sq_mass
    both = get_method(["dpo", "sft"], get_method(["dpo", "sft"]).params_cls(ld_alpha=0.5))
    assert both.reference_outputs == ("seq_logps", "token_logps") and both.name == "dpo+sft"
    cfg = RunConfig()
    assert cache_settings(cfg, ld.reference_outputs) != cache_settings(cfg, METHODS["dpo"].reference_outputs)


@pytest.mark.parametrize("params", [LD, WPO], ids=["ld", "wpo"])
def test_the_resolved_row_reads_exactly_what_its_flags_promise(params):
    spec = get_method("dpo", params)
    fields = random_fields(seed=24)
    for field in optional_fields(spec):
        with pytest.raises(ValueError, match=rf"'dpo'.*{field}"):
            dpo_loss(inputs_for(spec, fields, **{field: None}), params)
    other = random_fields(seed=25)
    extra = {n: other[n] for n in other if n not in spec.required_fields}
    assert torch.equal(dpo_loss(inputs_for(spec, fields), params).losses,
                       dpo_loss(inputs_for(spec, fields, **extra), params).losses)


def test_build_loss_inputs_fills_the_knobs_fields():
    """The reference's token_logps reach ref_*_token_logps (split chosen / rejected); a forward without
    log_sq_mass is refused naming it."""
    mask = torch.tensor([[0, 1, 1.0], [0, 1, 0], [0, 1, 1], [0, 0, 1]])
    fwd = SimpleNamespace(seq_logps=torch.arange(4.0), token_logps=-mask, log_sq_mass=-2 * mask)
    ref = ReferenceOutputs(example_ids=["a", "b"], seq_logps=torch.zeros(4), token_logps=-3 * mask)
    got = build_loss_inputs(get_method("dpo", DPOParams(ld_alpha=0.5, wpo_weighting=True)), fwd, mask, ref)
    assert torch.equal(got.ref_rejected_token_logps, -3 * mask[2:])
    assert torch.equal(got.policy_chosen_log_sq_mass, -2 * mask[:2])
    with pytest.raises(ValueError, match="log_sq_mass"):
        build_loss_inputs(get_method("dpo", WPO), SimpleNamespace(seq_logps=fwd.seq_logps, token_logps=fwd.token_logps,
                                                                  log_sq_mass=None), mask, ref)


@pytest.mark.parametrize("method,key,value", [
    ("dpo", "ld_alpha", 1.5), ("dpo", "ld_alpha", -0.1), ("dpo", "ld_alpha", "nan"), ("dpo", "wpo_weighting", 1),
    ("aot", "wpo_weighting", True), ("simpo", "wpo_weighting", True), ("ipo", "ld_alpha", 0.5)])
def test_bad_knobs_are_refused_naming_the_key(method, key, value):
    """Out of range on DPO, or set on a row that does not take it (an unknown key of that row; IPO's
    default h=token_mean refuses ld_alpha by value). The other rows: tests/test_losses_pair_knobs.py."""
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"method": {"name": method, key: value}})
    assert config_from_dict({"method": {"name": "dpo", "ld_alpha": 0.5, "wpo_weighting": True}}).method.params == \
        DPOParams(ld_alpha=0.5, wpo_weighting=True)
    assert PARAMS["dpo"].ld_alpha is None and PARAMS["dpo"].wpo_weighting is False
