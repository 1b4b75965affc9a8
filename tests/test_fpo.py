"""FPO end to end on the tiny demo world: cached features, ZeRO-3 hook, SAE refusals, training.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fpo.py -q

The union/MSE of the loss against a dense reference lives in
tests/test_losses_common.py::test_pooled_union_mse_matches_a_dense_reference (not repeated here).
Runs go through the real `sparsepo.train` (and the deepspeed launcher for 2 ranks), like
tests/test_trainer.py; the SAEs are small TopK SAEs trained here in a few seconds each.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import RECIPE, read_scalars, run_training

pytestmark = pytest.mark.distributed

LAYER = 1  # the demo recipe's sae.layer: the last decoder layer of the 2-layer tiny Llama
D_SAE, SAE_K = 128, 8  # SAE width and its per-token TopK
K = 8  # FPO's top-k (method.k); the cache stores exactly K (ids, values) per response
STEPS = 3
COMMON = ("method.name=fpo", f"method.k={K}", "optim.lr=2e-3", "optim.schedule=constant", "optim.warmup_steps=0")


def world_config(world, *overrides: str):
    from sparsepo.config import load_config

    return load_config(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                "method.name=fpo", "logging.progress=false", *overrides])


def train_demo_sae(world, out, *overrides: str):
    """What `sparsepo sae train --d-sae 128 --k 8 --steps 200` does (sparsepo.sae.runtime.train_for_run)."""
    from sparsepo.sae.runtime import train_for_run

    cfg = world_config(world, f"sae.path={out}", *overrides)
    stats = train_for_run(cfg, out, d_sae=D_SAE, k=SAE_K, steps=200, max_tokens=20_000)
    assert stats["explained_variance"] > 0.5, stats
    return out


@pytest.fixture(scope="module")
def sae_dir(tiny_world, tmp_path_factory):
    return train_demo_sae(tiny_world, tmp_path_factory.mktemp("sae") / "seed0")


@pytest.fixture(scope="module")
def other_sae_dir(tiny_world, tmp_path_factory):
    """Same model, layer and shape, another seed: different weights, so a different fingerprint."""
    return train_demo_sae(tiny_world, tmp_path_factory.mktemp("sae") / "seed1", "train.seed=1")


@pytest.fixture(scope="module")
def narrow_sae_dir(tmp_path_factory):
    """An SAE for a 16-wide model (the tiny world's is 32 wide), labelled with the right layer."""
    from sparsepo.sae import save_sae, train_sae

    acts = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    sae, stats = train_sae(acts, d_sae=32, k=4, steps=20, batch_size=128, progress=False)
    return save_sae(sae, tmp_path_factory.mktemp("sae") / "narrow", layer=LAYER, stats=stats)


@pytest.fixture(scope="module")
def fpo_one(tiny_world, sae_dir, tmp_path_factory):
    """One rank, micro 4 x accum 2: the same 4-pair micro-batches that the two ranks below see."""
    run = tmp_path_factory.mktemp("fpo1")
    run_training(tiny_world, run, *COMMON, f"sae.path={sae_dir}", "train.micro_batch_size=4",
                 "train.grad_accum=2", f"train.max_steps={STEPS}", nproc=1)
    return run


@pytest.fixture(scope="module")
def fpo_two(tiny_world, sae_dir, fpo_one, tmp_path_factory):
    """Two ZeRO-3 ranks, micro 4 each, reading the cache the one-rank run built (so any difference
    comes from the policy side: the layer hook on a partitioned model, pooling, the loss)."""
    run = tmp_path_factory.mktemp("fpo2")
    run_training(tiny_world, run, *COMMON, f"sae.path={sae_dir}", "train.micro_batch_size=4",
                 f"train.max_steps={STEPS}", f"reference.cache_dir={fpo_one / 'ref_cache'}", nproc=2)
    return run


def dense_pooled(model, sae, batch, layer: int) -> torch.Tensor:
    """By hand, without the capture hook: full forward with output_hidden_states -> encode every
    response token -> mean per row. (N, d_sae)

    hidden_states[ℓ+1] is decoder layer ℓ's output except for the last layer, where transformers
    returns it after the final norm; the SAE reads the pre-norm residual (sae-lens
    blocks.ℓ.hook_resid_post), so the norm is swapped out for the forward."""
    inner = model.model
    norm = inner.norm
    if layer == len(inner.layers) - 1:
        inner.norm = torch.nn.Identity()
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    finally:
        inner.norm = norm
    hidden = out.hidden_states[layer + 1]
    rows = []
    for r in range(hidden.shape[0]):
        tokens = hidden[r][batch.response_mask[r].bool()]  # (|y|, D)
        rows.append(torch.stack([sae.encode(tokens[t:t + 1])[0] for t in range(tokens.shape[0])]).mean(0))
    return torch.stack(rows)


def assert_topk_of(dense: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, atol: float) -> None:
    """ids/values are a top-k of `dense`: values sorted and equal to dense's k largest, each id's
    dense value equal to its stored value, ids unique (robust to exact ties, unlike comparing ids)."""
    k = ids.shape[-1]
    assert ids.shape == values.shape == (dense.shape[0], k)
    want = torch.topk(dense, k, dim=-1).values
    torch.testing.assert_close(values, want, rtol=0, atol=atol)
    torch.testing.assert_close(dense.gather(1, ids), values, rtol=0, atol=atol)
    assert all(len(set(row.tolist())) == k for row in ids)
    assert (values[:, :-1] >= values[:, 1:]).all()
    assert (values[:, 0] > 0).all()  # the pooled features are not all zero


@pytest.fixture(scope="module")
def scoring(tiny_world, sae_dir):
    from transformers import AutoModelForCausalLM

    from sparsepo import data as pdata
    from sparsepo.models import load_tokenizer
    from sparsepo.sae import load_sae

    cfg = world_config(tiny_world, f"sae.path={sae_dir}")
    tokenizer = load_tokenizer(str(tiny_world.sft_dir))
    dataset, _ = pdata.load_preference_dataset(cfg.data, tokenizer)
    batch = pdata.collate_pairs(pdata.gather_rows(dataset, list(range(6))), tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_world.sft_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, load_sae(str(sae_dir)), batch


@pytest.mark.parametrize("layer", [0, LAYER])
def test_scored_features_are_the_dense_top_k(scoring, layer):
    from sparsepo.sae.runtime import SAEFeatures
    from sparsepo.logprobs.head import PlainHead
    from sparsepo.reference.scorer import score_batch

    model, sae, batch = scoring  # (the SAE was trained on layer 1; at layer 0 it is just a fixed encoder)
    ro = score_batch(PlainHead(model), batch, outputs=("seq_logps", "feature_ids", "feature_values"), topk=4,
                     features=SAEFeatures(sae, layer=layer, k=K))
    with torch.no_grad():
        dense = dense_pooled(model, sae, batch, layer)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    assert (dense > 0).sum(-1).min() > K  # more active features than k: the top-k is a real selection
    assert_topk_of(dense, ro.feature_ids, ro.feature_values, atol=1e-6)
    assert ro.feature_ids.dtype == torch.long
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(ro.seq_logps, (token_logps * batch.response_mask[:, 1:]).sum(-1),
                               rtol=1e-6, atol=1e-5)


def test_cache_written_by_training_holds_the_dense_top_k(scoring, fpo_one):
    from sparsepo.reference.cache import CacheReader

    model, sae, batch = scoring
    records = CacheReader(fpo_one / "ref_cache").get(batch.example_ids)  # verifies checksums too
    b = batch.num_pairs
    ids = torch.stack([r["feature_ids"][0] for r in records] + [r["feature_ids"][1] for r in records])
    values = torch.stack([r["feature_values"][0] for r in records] + [r["feature_values"][1] for r in records])
    with torch.no_grad():
        dense = dense_pooled(model, sae, batch, LAYER)
    assert ids.shape == (2 * b, K)
    # the cache was scored in batches of reference.batch_size with other padding: float noise only
    assert_topk_of(dense, ids, values, atol=1e-5)


def test_zero3_two_ranks_log_the_same_features_as_one(fpo_one, fpo_two):
    """The policy-side hook sees the same layer output on a ZeRO-3 model partitioned over 2 ranks as on
    1 rank. Both runs split each global batch of 8 into the same two micro-batches of 4 (1 rank:
    accum 2; 2 ranks: one each): the per-micro-batch SAE statistics (explained variance is a ratio
    over the micro-batch's tokens) are then averaged over the same pieces."""
    tags = ["loss", "feature_mse_chosen", "feature_mse_rejected", "sae_explained_variance", "sae_l0",
            "union_size", "margin"]
    for tag in tags:
        one, two = read_scalars(fpo_one, f"train/{tag}"), read_scalars(fpo_two, f"train/{tag}")
        assert sorted(one) == sorted(two) == list(range(1, STEPS + 1)), tag
        for step in one:
            assert one[step] == pytest.approx(two[step], abs=1e-5, rel=1e-5), (tag, step, one, two)
    # not vacuous: after the first update the policy's features have left the reference's
    mse = read_scalars(fpo_one, "train/feature_mse_rejected")
    assert mse[1] == pytest.approx(0.0, abs=1e-9)  # step 1: policy == reference
    assert mse[STEPS] > 1e-6


def test_sae_of_another_width_is_refused(tiny_world, narrow_sae_dir, tmp_path):
    proc = run_training(tiny_world, tmp_path, *COMMON, f"sae.path={narrow_sae_dir}", "train.max_steps=1",
                        check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "has d_in=16 but the model's hidden size is 32" in out, out[-3000:]
    assert not (tmp_path / "ref_cache").exists()  # refused before scoring anything


def test_sae_of_another_layer_is_refused(tiny_world, sae_dir):
    from sparsepo.sae.runtime import load_for_run

    assert load_for_run(world_config(tiny_world, f"sae.path={sae_dir}", f"sae.layer={LAYER}")).layer == LAYER
    with pytest.raises(ValueError, match=r"trained on layer 1 \(blocks\.1\.hook_resid_post\) but sae\.layer=0"):
        load_for_run(world_config(tiny_world, f"sae.path={sae_dir}", "sae.layer=0"))
    with pytest.raises(ValueError, match=r"sae\.layer=2 is out of range .* 2 decoder layers"):
        load_for_run(world_config(tiny_world, f"sae.path={sae_dir}", "sae.layer=2"))


def test_cache_built_with_another_sae_is_refused(tiny_world, sae_dir, other_sae_dir, fpo_one, tmp_path):
    import json

    from sparsepo.sae import SIDECAR

    fp_cache = json.loads((sae_dir / SIDECAR).read_text())["sae_fingerprint"]
    fp_run = json.loads((other_sae_dir / SIDECAR).read_text())["sae_fingerprint"]
    assert fp_cache != fp_run
    proc = run_training(tiny_world, tmp_path, *COMMON, f"sae.path={other_sae_dir}", "train.micro_batch_size=4",
                        "train.max_steps=1", f"reference.cache_dir={fpo_one / 'ref_cache'}", check=False,
                        timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # only the settings component differs (same model, tokenizer, data), and it shows both SAEs
    assert "does not match this run: settings differs." in out, out[-3000:]
    assert fp_cache in out and fp_run in out


def test_fpo_fits_a_fixed_batch_of_demo_pairs(tiny_world, sae_dir, tmp_path):
    """8 demo pairs = one global batch, seen once per epoch for 8 epochs: the loss falls, and the
    feature distance stays finite and bounded by 4x the reference's own pooled-feature energy
    E_ref = mean over responses of (1/k)·Σ c̄ref² (the policy's pooled features stay within 2x the
    reference's RMS feature size of them). Measured: max D_F ≈ 1.5·E_ref after 8 steps at lr 2e-3."""
    from sparsepo.reference.cache import CacheReader

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(tiny_world.train_path.read_text().splitlines(keepends=True)[:8]))
    run = tmp_path / "run"
    run_training(tiny_world, run, *COMMON, f"sae.path={sae_dir}", f"data.path={pairs}",
                 "train.micro_batch_size=8", "train.epochs=8", nproc=1)
    loss = read_scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 0.1, loss
    assert loss[8] == min(loss.values()), loss

    reader = CacheReader(run / "ref_cache")
    values = torch.stack([v for s in range(len(reader.shards)) for rec in reader._shard(s)
                          for v in rec["feature_values"]])
    assert values.shape == (16, K)
    e_ref = float((values.pow(2).sum(-1) / K).mean())
    assert e_ref > 0
    for tag in ("feature_mse_chosen", "feature_mse_rejected"):
        mse = read_scalars(run, f"train/{tag}")
        assert sorted(mse) == list(range(1, 9))
        assert all(math.isfinite(v) and v >= 0 for v in mse.values()), (tag, mse)
        assert max(mse.values()) < 4 * e_ref, (tag, mse, e_ref)
        assert mse[8] > 0, (tag, mse)  # the policy's features moved (the hook feeds the loss)
    ev = read_scalars(run, "train/sae_explained_variance")
    assert all(math.isfinite(v) and v <= 1 for v in ev.values()), ev


@pytest.mark.slow
def test_fpo_inline_with_the_official_knobs(tiny_world, sae_dir, tmp_path):
    """index_set=policy_topk (the inline reference serves all D_SAE pooled features) and
    pool=predicting_states train in inline mode: finite losses and feature distances at every step,
    and the distance is the official one (|I| = k exactly, never the union's up to 2k)."""
    run = tmp_path / "run"
    run_training(tiny_world, run, *COMMON, f"sae.path={sae_dir}", "reference.mode=inline",
                 "method.index_set=policy_topk", "method.pool=predicting_states", "train.micro_batch_size=4",
                 f"train.max_steps={STEPS}", nproc=1)
    loss = read_scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in loss.values()), loss
    for tag in ("feature_mse_chosen", "feature_mse_rejected"):
        mse = read_scalars(run, f"train/{tag}")
        assert mse[1] == 0.0 and all(math.isfinite(v) and v > 0 for s, v in mse.items() if s > 1), (tag, mse)
    assert set(read_scalars(run, "train/union_size").values()) == {float(K)}
