"""FPO's knobs against the official code's choices (issue 24): `index_set` (union / policy_topk) and
`pool` (response / predicting_states), by hand; the modes that cannot serve policy_topk refuse it.
Training with both knobs in inline mode: tests/test_fpo.py::test_fpo_inline_with_the_official_knobs.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_losses_fpo_knobs.py
"""

import pytest
import torch

from loss_fields import F64, TOL, softplus_neg, t
from sparsepo.config import ConfigError, load_config
from sparsepo.losses import FPOParams, LossInputs, fpo_loss, pooled_union_mse
from sparsepo.losses.fpo import policy_topk_mse
from sparsepo.sae.features import pooled_features, pooling_mask
from sparsepo.sae.runtime import SAEFeatures

pytestmark = pytest.mark.unit

POLICY = t([[3.0, 1.0, 2.0, 0.0]])
REF = t([[1.0, 2.0, 0.5, 4.0]])
"""One response, F=4 pooled features on each side; k=2."""


def test_policy_topk_distance_by_hand():
    """k=2. policy_topk (official): the policy's top-2 are ids 0 and 2, the reference read there:
    ((3 − 1)² + (2 − 0.5)²)/2 = (4 + 2.25)/2 = 3.125, |I| = 2.
    union with the reference's stored top-2 (ids 3, 1; 0 elsewhere): I = {0, 2} ∪ {3, 1}, all four:
    (9 + (1 − 2)² + 4 + 16)/2 = 15, |I| = 4: the reference's own top features the policy dropped count."""
    ids = torch.arange(4).unsqueeze(0)
    mse, size = policy_topk_mse(POLICY, ids, REF, 2)
    assert mse.item() == pytest.approx(3.125, abs=TOL) and size.item() == 2
    stored_ids, stored = REF.topk(2, dim=-1).indices, REF.topk(2, dim=-1).values
    mse, size = pooled_union_mse(POLICY, stored_ids, stored, 2)
    assert mse.item() == pytest.approx(15.0, abs=TOL) and size.item() == 4


def test_fpo_loss_with_the_official_index_set_by_hand():
    """β=0.1, α=0.5, k=2, equal log-ratios (so the reward margin and γ_ref are 0). Chosen: D_w = 3.125
    (above). Rejected c̄θ = (0, 0, 1, 1), c̄ref = (0, 0, 1, 3): top-2 ids {2, 3}, D_l = (0 + 4)/2 = 2.
    logit = −α·(β·D_l − β·D_w) = −0.5·(0.2 − 0.3125) = 0.05625; loss ℓ(0.05625) = 0.66541764.
    The reference must be dense (all F ids): its stored top-k alone is refused, naming the knob."""
    same = dict(policy_chosen_logps=t([-4.0]), policy_rejected_logps=t([-6.0]), ref_chosen_logps=t([-4.0]),
                ref_rejected_logps=t([-6.0]), chosen_mask=t([[0, 1, 1]]), rejected_mask=t([[0, 1, 1]]))
    ids = torch.arange(4).unsqueeze(0)
    inputs = LossInputs(**same, policy_chosen_features=POLICY, policy_rejected_features=t([[0.0, 0.0, 1.0, 1.0]]),
                        ref_chosen_feature_ids=ids, ref_chosen_feature_values=REF,
                        ref_rejected_feature_ids=ids, ref_rejected_feature_values=t([[0.0, 0.0, 1.0, 3.0]]))
    out = fpo_loss(inputs, FPOParams(k=2, index_set="policy_topk"))
    assert out.losses.item() == pytest.approx(0.66541764, abs=1e-8)
    assert softplus_neg(0.05625) == pytest.approx(0.66541764, abs=1e-8)
    assert out.metrics["union_size"].item() == 2
    top = REF.topk(2, dim=-1)
    cached = LossInputs(**same, policy_chosen_features=POLICY, policy_rejected_features=POLICY,
                        ref_chosen_feature_ids=top.indices, ref_chosen_feature_values=top.values,
                        ref_rejected_feature_ids=top.indices, ref_rejected_feature_values=top.values)
    with pytest.raises(ValueError, match="index_set=policy_topk reads the reference at the policy's ids"):
        fpo_loss(cached, FPOParams(k=2, index_set="policy_topk"))


def test_pooling_masks_by_hand():
    """Response tokens at positions 2..4 of 6: "predicting_states" pools the states at 1..3, which
    predict them (position t−1 for token t); "response" the tokens' own."""
    mask = t([[0, 0, 1, 1, 1, 0]])
    assert pooling_mask(mask, "response") is mask
    assert pooling_mask(mask, "predicting_states").tolist() == [[0, 1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="pool must be one of"):
        pooling_mask(mask, "last")


class _SAE(torch.nn.Module):
    """encode = relu(x @ W_enc): enough of sae-lens' interface for `pooled_features`."""

    def __init__(self, d_in=3, d_sae=5):
        super().__init__()
        self.cfg = type("Cfg", (), {"d_in": d_in, "d_sae": d_sae})()
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(0),
                                                    dtype=F64), requires_grad=False)

    def encode(self, x):
        return torch.relu(x @ self.W_enc)


class _Cap:
    def __init__(self, hidden):
        self.hidden = hidden

    def take(self):
        return self.hidden


def features(**kw):
    f = SAEFeatures.__new__(SAEFeatures)  # skip the fingerprint of a real sae-lens SAE
    f.sae, f.layer, f.k = _SAE(), 0, 2
    for key, value in kw.items():
        setattr(f, key, value)
    return f


def test_both_sides_pool_the_same_states_and_dense_serves_every_feature():
    """The reference's entries and the policy's pooled features come from the pooling mask of `pool`
    (the same function on both sides), and `dense` (index_set=policy_topk) serves ids 0..F−1 with the
    pooled values, which the top-k entries are a selection of."""
    hidden = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    mask = t([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    batch = type("Batch", (), {"response_mask": mask})()
    for pool in ("response", "predicting_states"):
        want = pooled_features(_SAE(), hidden, pooling_mask(mask, pool))
        policy, _ = features(pool=pool).policy(_Cap(hidden), batch, stats=False)
        torch.testing.assert_close(policy, want, rtol=0, atol=0)
        dense = features(pool=pool, dense=True).reference(_Cap(hidden), batch)
        assert dense["feature_ids"].tolist() == [list(range(5))] * 2
        torch.testing.assert_close(dense["feature_values"], want, rtol=0, atol=0)
        top = features(pool=pool).reference(_Cap(hidden), batch)
        torch.testing.assert_close(top["feature_values"], want.topk(2, dim=-1).values, rtol=0, atol=0)
    assert not torch.equal(pooled_features(_SAE(), hidden, mask),
                           pooled_features(_SAE(), hidden, pooling_mask(mask, "predicting_states")))


@pytest.mark.parametrize("mode", ["cache", "precompute"])
def test_policy_topk_is_refused_where_the_reference_serves_its_own_top_k(mode):
    fpo = ["method.name=fpo", "sae.path=/nonexistent/sae", "method.index_set=policy_topk"]
    with pytest.raises(ConfigError, match=rf"index_set=policy_topk .* reference.mode={mode} .*reference.mode=inline"):
        load_config(None, [*fpo, f"reference.mode={mode}"])
    cfg = load_config(None, [*fpo, "reference.mode=inline", "method.pool=predicting_states"])
    assert (cfg.method.params.index_set, cfg.method.params.pool) == ("policy_topk", "predicting_states")
    with pytest.raises(ConfigError, match="FPOParams: pool must be one of"):
        load_config(None, ["method.name=fpo", "sae.path=/x", "method.pool=last"])
    with pytest.raises(ConfigError, match="FPOParams: index_set must be one of"):
        load_config(None, ["method.name=fpo", "sae.path=/x", "method.index_set=dense"])


def test_live_mode_refuses_policy_topk():
    with pytest.raises(ConfigError, match=r"reference.mode=live"):
        load_config(None, ["method.name=fpo", "sae.path=/x", "method.index_set=policy_topk", "reference.mode=live",
                           "topology.reference_ranks=1", "topology.pipeline_stages=1"])
