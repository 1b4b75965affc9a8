"""Every row this table shares with TRL 1.16 against TRL's own loss code, float64, values and gradients.

TRL is not a dependency: these tests skip unless TRL 1.16 imports. To run them:

    pip download trl==1.16.0 --no-deps -d /tmp/trl && unzip -q /tmp/trl/trl-1.16.0-*.whl -d /tmp/trl/src
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:/tmp/trl/src .venv/bin/python -m pytest -q tests/test_losses_trl.py

(TRL's own dependencies — transformers, accelerate, datasets — are the project's.) The harness
(tests/trl_harness.py) calls `DPOTrainer._compute_loss` with a stand-in forward that returns our
token log-probs, and `CPOTrainer.cpo_loss` as it is. Where TRL and we differ on purpose, the case
is built so the difference cannot show (said at each case).
"""

import dataclasses

import pytest
import torch

from loss_fields import F64
from sparsepo.losses import METHODS, LossInputs, get_method

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16"):
    pytest.skip(f"written against TRL 1.16 (found {trl.__version__})", allow_module_level=True)

from trl_harness import trl_cpo_loss, trl_dpo_loss  # noqa: E402

OURS = {"sigmoid": "dpo"}
"""TRL's loss_type -> our row, where the names differ."""
TRL_PARAMS = {"robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 1e-3}}
"""TRL's knob values that equal our rows' defaults (TRL's global default differs)."""
OUR_PARAMS = {"bco_pair": {"baseline": "none"}}
"""bco_pair: TRL 1.16's δ = 0 is our baseline="none"."""
F_ROWS = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")


def pair_fields(B=4, T=8, seed=0, equal_chosen=False):
    """Float64 fields, responses of varied lengths (or chosen all 4 tokens long), all sums consistent with
    the token log-probs, the reference within ~1 nat of the policy, log Σp² below each token's log-prob."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(4, 2), (3, 5), (4, 4), (2, 6)] if not equal_chosen else [(4, 2), (4, 5), (4, 4), (4, 6)]
    out = {}
    for side, k in (("chosen", 0), ("rejected", 1)):
        mask = torch.zeros(B, T, dtype=F64)
        for i in range(B):
            mask[i, 1:1 + lengths[i][k]] = 1
        pol = (-2 * torch.rand(B, T, generator=g, dtype=F64) - 0.1) * mask
        ref = (pol + 0.4 * torch.randn(B, T, generator=g, dtype=F64)) * mask
        sq = (pol - 0.3 * torch.rand(B, T, generator=g, dtype=F64)) * mask
        out.update({f"{side}_mask": mask, f"policy_{side}_token_logps": pol, f"ref_{side}_token_logps": ref,
                    f"policy_{side}_log_sq_mass": sq, f"policy_{side}_logps": pol.sum(-1),
                    f"ref_{side}_logps": ref.sum(-1)})
    return out


def ours(name, fields, leaf, **params):
    """Our row's mean loss on `fields` with the policy's token log-probs taken from `leaf` (2B,T)."""
    spec = get_method(name)
    p = spec.params_cls(**{**OUR_PARAMS.get(name, {}), **params})
    spec = get_method(name, p)
    b = leaf.shape[0] // 2
    f = dict(fields, policy_chosen_token_logps=leaf[:b], policy_rejected_token_logps=leaf[b:],
             policy_chosen_logps=(leaf[:b] * fields["chosen_mask"]).sum(-1),
             policy_rejected_logps=(leaf[b:] * fields["rejected_mask"]).sum(-1))
    return spec.loss_fn(LossInputs(**{k: f[k] for k in spec.required_fields}), p)


def compare(fields, our_name, trl_types, our_params=None, trl_kwargs=None, tol=1e-12, grads=True):
    """Values and (with `grads`) gradients wrt the policy's token log-probs agree to `tol` (absolute).
    exo_pair: TRL takes log ε and log(1−ε) of a float32 tensor (`torch.tensor(label_smoothing)`), which
    moves its float64 loss by ~5e-8; that row is compared to 1e-7."""
    tol = max(tol, 1e-7) if "exo_pair" in trl_types else tol
    start = torch.cat([fields["policy_chosen_token_logps"], fields["policy_rejected_token_logps"]])
    mine, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    a = ours(our_name, fields, mine, **(our_params or {})).losses.mean()
    b = trl_dpo_loss(fields, trl_types, policy_leaf=theirs, **(trl_kwargs or {}))
    assert abs(a.item() - b.item()) <= tol, (a.item(), b.item())
    if grads:
        a.backward()
        b.backward()
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=tol)
    return a.item()


SHARED = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
          "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("loss_type", SHARED)
def test_every_shared_row_equals_trl(loss_type):
    """Each of TRL 1.16's DPO loss types = our row of that name, at our defaults (B=4, varied lengths;
    aot/aot_unpaired sort across the 4 pairs, as TRL)."""
    fields = pair_fields(seed=1)
    value = compare(fields, OURS.get(loss_type, loss_type), [loss_type], trl_kwargs=TRL_PARAMS.get(loss_type))
    assert value != 0.0


def test_sft_equals_trl_on_chosen_responses_of_one_length():
    """TRL's sft is one token mean over the batch's chosen tokens, ours the mean of per-response means:
    equal when the chosen responses have one length (4 tokens here); [sigmoid, sft] weighted too."""
    fields = pair_fields(seed=2, equal_chosen=True)
    compare(fields, "sft", ["sft"])
    spec = get_method(["dpo", "sft"])
    start = torch.cat([fields["policy_chosen_token_logps"], fields["policy_rejected_token_logps"]])
    mine, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    b = len(start) // 2
    f = dict(fields, policy_chosen_token_logps=mine[:b], policy_rejected_token_logps=mine[b:],
             policy_chosen_logps=(mine[:b] * fields["chosen_mask"]).sum(-1),
             policy_rejected_logps=(mine[b:] * fields["rejected_mask"]).sum(-1))
    a = spec.loss_fn(LossInputs(**{k: f[k] for k in spec.required_fields}), spec.params_cls(weights=[1.0, 0.3]))
    a = a.losses.mean()
    t = trl_dpo_loss(fields, ["sigmoid", "sft"], loss_weights=[1.0, 0.3], policy_leaf=theirs)
    a.backward()
    t.backward()
    assert abs(a.item() - t.item()) < 1e-12
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)
    # and RPO written as one row: dpo with sft_weight=0.3 is the same sum
    assert ours("dpo", fields, start, sft_weight=0.3).losses.mean().item() == pytest.approx(t.item(), abs=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("loss_type", F_ROWS)
def test_f_divergences_equal_trl(loss_type, divergence):
    """f-DPO's forward KL and JS on every row TRL allows them on, float64."""
    fields = pair_fields(seed=3)
    compare(fields, OURS.get(loss_type, loss_type), [loss_type],
            our_params={"f_divergence_type": divergence},
            trl_kwargs={**TRL_PARAMS.get(loss_type, {}), "f_divergence_type": divergence})


@pytest.mark.parametrize("coef", [0.5, 0.2, 1.7, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm"])
def test_alpha_divergence_equals_trl_in_float32(loss_type, coef):
    """TRL's alpha_divergence has no float64 branch (its clamp table knows fp16/bf16/fp32 only), so this
    one runs in float32, to float32's precision."""
    fields = {k: v.float() for k, v in pair_fields(seed=4).items()}
    compare(fields, OURS.get(loss_type, loss_type), [loss_type], tol=2e-5,
            our_params={"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": coef},
            trl_kwargs={"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": coef})


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "nca_pair", "sppo_hard", "apo_zero", "discopop"])
def test_wpo_weighting_equals_trl(loss_type):
    """use_weighting: the uncapped pair weight (the default wpo_clip=None), on rows of both kinds.
    hinge: TRL 1.16 weighs in place (`per_sequence_loss *= ...`) the output of relu, which relu's
    backward needs, so its backward fails there: values only (its gradient is DPO-hinge's times w)."""
    fields = pair_fields(seed=5)
    kwargs = {**TRL_PARAMS.get(loss_type, {}), "use_weighting": True}
    compare(fields, OURS.get(loss_type, loss_type), [loss_type], our_params={"wpo_weighting": True},
            trl_kwargs=kwargs, grads=loss_type != "hinge")
    if loss_type == "hinge":
        with pytest.raises(RuntimeError, match="inplace operation"):
            leaf = torch.cat([fields["policy_chosen_token_logps"], fields["policy_rejected_token_logps"]])
            trl_dpo_loss(fields, ["hinge"], policy_leaf=leaf.clone().requires_grad_(True), **kwargs).backward()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "bco_pair", "aot_unpaired", "apo_down"])
def test_ld_alpha_equals_trl(loss_type):
    """ld_alpha=0.4: both sides desensitised (TRL's reference forward path, which applies it to the
    reference too); the pairs have unequal lengths, so it differs from the plain row."""
    fields = pair_fields(seed=6)
    name = OURS.get(loss_type, loss_type)
    value = compare(fields, name, [loss_type], our_params={"ld_alpha": 0.4},
                    trl_kwargs={**TRL_PARAMS.get(loss_type, {}), "ld_alpha": 0.4})
    plain = ours(name, fields, torch.cat([fields["policy_chosen_token_logps"], fields["policy_rejected_token_logps"]]))
    assert abs(plain.losses.mean().item() - value) > 1e-5


def avg(fields, side):
    return fields[f"policy_{side}_logps"] / fields[f"{side}_mask"].sum(-1)


@pytest.mark.parametrize("row,loss_type,params,trl_kwargs,averaged", [
    ("cpo", "sigmoid", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}, False),
    ("cpo_hinge", "hinge", {}, {}, False),
    ("cpo_ipo", "ipo", {}, {}, True),
    ("alphapo", "simpo", {}, {"alpha": 0.25, "simpo_gamma": 0.5}, True),
    ("alphapo", "simpo", {"alpha": -0.3, "beta": 2.0, "gamma": 1.0, "label_smoothing": 0.05},
     {"alpha": -0.3, "beta": 2.0, "simpo_gamma": 1.0, "label_smoothing": 0.05}, True),
])
def test_cpo_rows_equal_trl(row, loss_type, params, trl_kwargs, averaged):
    """TRL's CPOTrainer.cpo_loss (the preference term; cpo_alpha=0 on our side, since TRL adds its NLL
    outside cpo_loss, as a token mean over the batch): losses, gradients and rewards."""
    fields = pair_fields(seed=7)
    spec = METHODS[row]
    p = dataclasses.replace(spec.params_cls(), cpo_alpha=0.0, **params)
    start = torch.cat([fields["policy_chosen_token_logps"], fields["policy_rejected_token_logps"]])
    mine, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    out = ours(row, fields, mine, **dataclasses.asdict(p))
    b = len(start) // 2
    sums = [(theirs[:b] * fields["chosen_mask"]).sum(-1), (theirs[b:] * fields["rejected_mask"]).sum(-1)]
    if averaged:
        sums = [sums[0] / fields["chosen_mask"].sum(-1), sums[1] / fields["rejected_mask"].sum(-1)]
    losses, chosen, rejected = trl_cpo_loss(*sums, loss_type, beta=p.beta, **{k: v for k, v in trl_kwargs.items()
                                                                             if k != "beta"})
    torch.testing.assert_close(out.losses, losses, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, chosen, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, rejected, rtol=0, atol=1e-12)
    out.losses.sum().backward()
    losses.sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)
