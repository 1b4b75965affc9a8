"""Live mode serves FPO's SAE features: the pipeline reference group carries decoder layer ℓ's output
to its last stage, which alone holds the SAE and sends the pooled top-k feature ids/values.

2 policy ranks + 2 pipeline stages (4 processes, CPU/gloo) against FPO in cache mode on 2 policy
ranks: same loss curve (1e-5), and the live write-through cache is keyed exactly like cache mode's
(SAE fingerprint, layer, k) and holds the same features.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_live_fpo.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import RECIPE, REPO, read_scalars, run_training, train_env

pytestmark = pytest.mark.distributed

LAYER = 1  # the last decoder layer of the 2-layer tiny Llama: it lives on the last pipeline stage
K = 8  # FPO's top-k (method.k)
# one whole epoch (the write-through cache is indexed once every pair has been scored)
COMMON = ("method.name=fpo", f"method.k={K}", f"sae.layer={LAYER}", "train.micro_batch_size=2", "train.epochs=1",
          "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_steps=0")
LIVE = ("reference.mode=live", "topology.reference_ranks=2", "topology.pipeline_stages=2")


@pytest.fixture(scope="module")
def sae_dir(tiny_world, tmp_path_factory):
    """An SAE for the tiny world's layer 1, trained once through the CLI."""
    out = tmp_path_factory.mktemp("sae") / f"layer{LAYER}"
    cmd = [sys.executable, "-m", "sparsepo.cli", "sae", "train", "--config", str(RECIPE), "--out", str(out),
           "--steps", "200", "--k", "8", f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
           f"sae.layer={LAYER}", "logging.progress=false"]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def live_run(tiny_world, sae_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("live_fpo")
    proc = run_training(tiny_world, run, *COMMON, *LIVE, f"sae.path={sae_dir}", nproc=4)
    return run, proc


@pytest.fixture(scope="module")
def cache_run(tiny_world, sae_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("cache_fpo")
    run_training(tiny_world, run, *COMMON, f"sae.path={sae_dir}", nproc=2)
    return run


def test_live_outputs_accept_fpo_with_an_sae(tiny_world, sae_dir):
    from sparsepo.config import load_config
    from sparsepo.reference_role.server import live_outputs

    cfg = load_config(RECIPE, [f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                               *COMMON, *LIVE, f"sae.path={sae_dir}"])
    assert live_outputs(cfg) == ("seq_logps", "feature_ids", "feature_values")


def test_live_fpo_matches_cache_mode(live_run, cache_run, tiny_world):
    run, _ = live_run
    live, cache = read_scalars(run, "train/loss"), read_scalars(cache_run, "train/loss")
    steps = len(tiny_world.train_path.read_text().splitlines()) // 4
    assert sorted(live) == sorted(cache) == list(range(1, steps + 1))
    for step in live:
        assert live[step] == pytest.approx(cache[step], abs=1e-5), (step, live, cache)
    # the feature term is live too (not only the log-prob part of the loss)
    live_mse, cache_mse = (read_scalars(r, "train/feature_mse_chosen") for r in (run, cache_run))
    assert sorted(live_mse) == sorted(live) and any(v > 0 for v in live_mse.values())
    for step in live_mse:
        assert live_mse[step] == pytest.approx(cache_mse[step], abs=1e-5)


def test_live_fpo_write_through_is_keyed_and_filled_like_cache_mode(live_run, cache_run, sae_dir):
    """Same fingerprint (model, data, settings incl. the SAE fingerprint, layer and k) and the same
    feature ids / values per pair: a later cache-mode run would reuse the live cache as is."""
    from sparsepo.reference.cache import CacheReader

    live_dir, cache_dir = live_run[0] / "ref_cache", cache_run / "ref_cache"
    live_index, cache_index = (json.loads((d / "index.json").read_text()) for d in (live_dir, cache_dir))
    assert live_index["fingerprint"] == cache_index["fingerprint"]
    settings = json.loads(live_index["fingerprint"]["settings_detail"])
    sidecar = json.loads((sae_dir / "sparsepo_sae.json").read_text())
    assert settings["sae"] == sidecar["sae_fingerprint"] and settings["layer"] == LAYER and settings["k"] == K
    assert settings["outputs"] == ["seq_logps", "feature_ids", "feature_values"]
    live_reader, cache_reader = CacheReader(live_dir, cache_index["fingerprint"]), CacheReader(cache_dir)
    ids = sorted(cache_reader.location)
    assert sorted(live_reader.location) == ids
    for got, want in zip(live_reader.get(ids), cache_reader.get(ids)):
        assert set(got) == set(want) == {"seq_logps", "feature_ids", "feature_values"}
        for side in (0, 1):
            assert got["feature_ids"][side].shape == (K,)
            assert torch.equal(got["feature_ids"][side], want["feature_ids"][side])
            torch.testing.assert_close(got["feature_values"][side], want["feature_values"][side], atol=1e-5, rtol=0)
            # sums of ~50 token log-probs near -100: a few float32 ulps apart (other batch padding)
            torch.testing.assert_close(got["seq_logps"][side], want["seq_logps"][side], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("mode", [pytest.param("live", marks=pytest.mark.slow), "inline"])
def test_an_sae_of_another_model_is_refused_in_every_mode(tiny_world, sae_dir, tmp_path, mode):
    """The SAE's sidecar names the model it was trained on; live and inline mode check it through the
    same `check_sae_compatible` as cache mode (live mode used to skip the check)."""
    import shutil

    from sparsepo.sae import SIDECAR

    other = tmp_path / "sae-of-another-model"
    shutil.copytree(sae_dir, other)
    meta = json.loads((other / SIDECAR).read_text())
    meta["model_fingerprint"] = "0123456789abcdef"
    (other / SIDECAR).write_text(json.dumps(meta))
    overrides = (*COMMON, *LIVE) if mode == "live" else (*COMMON, "reference.mode=inline")
    proc = run_training(tiny_world, tmp_path / "run", *overrides, f"sae.path={other}", nproc=4 if mode == "live" else 1,
                        check=False, timeout=240)
    assert proc.returncode != 0
    assert "was trained on activations of model 0123456789abcdef" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_fpo_with_a_reference_that_follows_the_policy_equals_inline(tiny_world, sae_dir, tmp_path):
    """TR-DPO's moving reference under FPO (α = 0.5 every 2 steps, 4 steps): the group's last stage
    reads the SAE features of its moved weights, as inline reads its moved copy's — losses and the
    feature term equal inline's step for step."""
    follow = (*COMMON, f"sae.path={sae_dir}", "train.max_steps=4", "optim.lr=1e-2",
              "reference.sync_alpha=0.5", "reference.sync_steps=2")
    inline, live = tmp_path / "inline", tmp_path / "live"
    run_training(tiny_world, inline, *follow, "reference.mode=inline", nproc=2)
    run_training(tiny_world, live, *follow, *LIVE, nproc=4)
    for tag in ("train/loss", "train/rewards/margins"):
        want, got = read_scalars(inline, tag), read_scalars(live, tag)
        assert sorted(got) == sorted(want) == [1, 2, 3, 4], tag
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=1e-5), (tag, step, got, want)
