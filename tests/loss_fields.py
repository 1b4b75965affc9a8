"""Shared test data for the loss tests: float64 helpers and every LossInputs field, random but valid."""

import math

import torch

from sparsepo.losses import BASE_FIELDS, METHODS, FPOParams, LossInputs

F64 = torch.float64
LN2 = math.log(2.0)
TOL = 1e-9  # hand values below are quoted to 1e-8 or better; float64 arithmetic is far tighter


def t(values):
    """A float64 tensor from a (nested) list: t([-10, -5]) is (2,), t([[0, 1, 1]]) is (1,3)."""
    return torch.tensor(values, dtype=F64)


def softplus_neg(z):
    """−log σ(z) = log(1 + e^{−z}), the value every hand example below ends in."""
    return math.log1p(math.exp(-z))


# Test params: defaults, except FPO's k (our random data has F=10 features and k=3 reference ids).
PARAMS = {name: spec.params_cls() for name, spec in METHODS.items()}
PARAMS["fpo"] = FPOParams(k=3)


def random_fields(seed=0, B=2, T=6, K=3, V=7, F=10, k=3, S=2, Ts=5):
    """Every LossInputs field, float64, shape-consistent, with valid sparse distributions."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    def sparse_pair(*lead):
        ref = torch.log_softmax(rnd(*lead, V), -1)
        pol = torch.log_softmax(ref + 0.7 * rnd(*lead, V), -1)
        ids = ref.topk(K, dim=-1).indices
        return ref.gather(-1, ids), pol.gather(-1, ids)

    chosen_mask, rejected_mask = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)
    chosen_mask[0, 2:6], chosen_mask[1, 1:4] = 1, 1
    rejected_mask[0, 1:6], rejected_mask[1, 3:5] = 1, 1
    chosen_tokens = -2 * torch.rand(B, T, generator=g, dtype=F64) - 0.1
    rejected_tokens = -2 * torch.rand(B, T, generator=g, dtype=F64) - 0.1
    out = dict(
        chosen_mask=chosen_mask, rejected_mask=rejected_mask,
        policy_chosen_token_logps=chosen_tokens, policy_rejected_token_logps=rejected_tokens,
        policy_chosen_logps=(chosen_tokens * chosen_mask).sum(-1),
        policy_rejected_logps=(rejected_tokens * rejected_mask).sum(-1),
    )
    out["ref_chosen_logps"] = out["policy_chosen_logps"] + 0.3 * rnd(B)
    out["ref_rejected_logps"] = out["policy_rejected_logps"] + 0.3 * rnd(B)
    out["ref_chosen_topk_logps"], out["policy_chosen_topk_logps"] = sparse_pair(B, T)
    out["ref_rejected_topk_logps"], out["policy_rejected_topk_logps"] = sparse_pair(B, T)
    for side in ("chosen", "rejected"):
        out[f"policy_{side}_features"] = rnd(B, F).abs()
        values, ids = rnd(B, F).abs().topk(k, dim=-1)
        out[f"ref_{side}_feature_ids"], out[f"ref_{side}_feature_values"] = ids, values
        out[f"{side}_oracle_scores"] = rnd(B, T)
    # eos ends chosen row 0 and both rejected rows; chosen row 1 was cut (no eos)
    out["chosen_eos_mask"], out["rejected_eos_mask"] = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)
    out["chosen_eos_mask"][0, 5] = out["rejected_eos_mask"][0, 5] = out["rejected_eos_mask"][1, 4] = 1
    sample_mask = torch.zeros(S, Ts, dtype=F64)
    sample_mask[0, 1:5], sample_mask[1, 1:3] = 1, 1
    out["sample_mask"] = sample_mask
    out["ref_sample_topk_logps"], out["policy_sample_topk_logps"] = sparse_pair(S, Ts)
    out["ref_sample_token_logps"], out["policy_sample_token_logps"] = -rnd(S, Ts).abs(), -rnd(S, Ts).abs()
    # drawn last, so the fields above keep their values: DPO's ld_alpha / wpo_weighting inputs
    for side in ("chosen", "rejected"):
        out[f"ref_{side}_token_logps"] = out[f"policy_{side}_token_logps"] + 0.3 * rnd(B, T)
        out[f"policy_{side}_log_sq_mass"] = -math.log(V) * torch.rand(B, T, generator=g, dtype=F64)
    return out


def inputs_for(spec, fields, **override):
    """A LossInputs holding only what the method's flags promise (plus overrides)."""
    kept = {name: fields[name] for name in spec.required_fields}
    kept.update(override)
    return LossInputs(**kept)


def optional_fields(spec):
    return [name for name in spec.required_fields if name not in BASE_FIELDS]


def policy_fields(spec):
    return [name for name in spec.required_fields if name.startswith("policy_")]


# Knob examples (DPO's in test_losses_dpo_knobs.py, the other rows' in test_losses_pair_knobs.py)
def rows(T, spans_values):
    """(mask, tokens) (B,T) from one [(start, values), ...] per row: the response's tokens at start.. ."""
    mask, tokens = torch.zeros(len(spans_values), T, dtype=F64), torch.zeros(len(spans_values), T, dtype=F64)
    for i, (start, values) in enumerate(spans_values):
        mask[i, start:start + len(values)] = 1
        tokens[i, start:start + len(values)] = t(values)
    return mask, tokens


def ld_inputs():
    """Two pairs, T=6; responses start mid-row (the public length counts response tokens, not positions)."""
    mw, pw = rows(6, [(2, [-1, -2, -3]), (1, [-0.5, -0.5])])
    _, rw = rows(6, [(2, [-1, -1, -1]), (1, [-1, -1])])
    ml, pl = rows(6, [(1, [-1, -1]), (1, [-1, -1, -2, -2])])
    _, rl = rows(6, [(1, [-2, -2]), (1, [-1, -1, -1, -1])])
    return dict(policy_chosen_logps=pw.sum(-1), policy_rejected_logps=pl.sum(-1), ref_chosen_logps=rw.sum(-1),
                ref_rejected_logps=rl.sum(-1), policy_chosen_token_logps=pw, policy_rejected_token_logps=pl,
                ref_chosen_token_logps=rw, ref_rejected_token_logps=rl, chosen_mask=mw, rejected_mask=ml)


def wpo_inputs():
    """The DPO hand example's sequence log-probs (z = 0.4 and 0) with token log-probs and log Σp² chosen
    for round weights."""
    mw, tw = rows(3, [(1, [math.log(0.5), math.log(0.5)]), (1, [math.log(0.9)])])
    ml, tl = rows(3, [(1, [math.log(0.25)]), (1, [math.log(0.9)])])
    _, sw = rows(3, [(1, [math.log(0.5), math.log(0.5)]), (1, [math.log(0.82)])])
    _, sl = rows(3, [(1, [math.log(0.5)]), (1, [math.log(0.82)])])
    return dict(policy_chosen_logps=t([-10, -5]), policy_rejected_logps=t([-15, -5]), ref_chosen_logps=t([-12, -5]),
                ref_rejected_logps=t([-13, -5]), policy_chosen_token_logps=tw, policy_rejected_token_logps=tl,
                policy_chosen_log_sq_mass=sw, policy_rejected_log_sq_mass=sl, chosen_mask=mw, rejected_mask=ml)
