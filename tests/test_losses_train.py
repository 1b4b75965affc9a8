"""Every method row added beside DPO (and a combination, method.name=[dpo, sft]) trains in cache
mode: `sparsepo train` on the demo recipe re-targeted at the row (`sparsepo.recipe.for_method`, as
`sparsepo demo --method` does), tiny demo world, one process, two optimizer steps, finite loss logged
at both steps. Rows beyond one per distinct set of reference outputs are `slow`
(`-m slow` runs them).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_losses_train.py

The DPO-family rows share one reference cache (they ask the reference for the same outputs, so the
cache's fingerprint is the same); cpo, orpo and sft are reference-free and build none. `ld_alpha`
(DPO's, and nca_pair's as a row beside DPO that takes the knobs) also asks for the reference's token
log-probs: its cache has another key, so its own directory (a cache directory holds one key); DPO's
trains inline too.
"""

import json
import math
import subprocess

import pytest

from conftest import RECIPE, REPO, read_scalars, train_command, train_env
from sparsepo.recipe import write_for_method
from sparsepo.reference.cache import INDEX

pytestmark = pytest.mark.integration
STEPS = 2
ROWS = [("hinge",), ("robust",), ("exo_pair",), ("nca_pair",), ("bco_pair",), ("sppo_hard",), ("aot",),
        ("aot_pair",), ("apo_zero",), ("apo_down",), ("discopop",), ("sigmoid_norm",), ("cpo",), ("orpo",),
        ("sft",), ("dpo", "method.sft_weight=0.5"), ("simpo", "method.gamma_beta_ratio=0.25"),
        (["dpo", "sft"], "method.weights=[1.0,0.1]"), ("dpo", "method.ld_alpha=0.5"), ("dpo", "method.wpo_weighting=true"),
        ("nca_pair", "method.ld_alpha=0.5", "method.wpo_weighting=true"), ("cpo_hinge",), ("cpo_ipo",),
        ("alphapo",), ("aot_unpaired",), ("dpo", "method.f_divergence_type=js_divergence")]
LD = "method.ld_alpha=0.5"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ref_cache")


def row_id(row):
    method, *knobs = row
    return "+".join(method) if isinstance(method, list) else "-".join([method, *knobs])


def train_two_steps(world, tmp_path, method, knobs, mode):
    recipe = write_for_method(RECIPE, method, tmp_path / "recipe.yaml")
    run = tmp_path / "run"
    cmd = train_command(recipe, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                 f"logging.output_dir={run}", "logging.progress=false", "logging.log_every=1",
                                 *knobs, *mode, "train.micro_batch_size=2", f"train.max_steps={STEPS}"])
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    loss = read_scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1)), loss
    assert all(math.isfinite(v) for v in loss.values()), loss
    return run


# The default run trains one row per distinct set of reference outputs (sequence log-probs; none;
# sequence + token log-probs; a weighted combination; the policy's log Σp²); the rest are `slow`.
DEFAULT_ROWS = {"hinge", "cpo", "dpo+sft", "dpo-method.ld_alpha=0.5", "dpo-method.wpo_weighting=true"}


def row_param(row):
    marks = () if row_id(row) in DEFAULT_ROWS else (pytest.mark.slow,)
    return pytest.param(row, id=row_id(row), marks=marks)


@pytest.mark.parametrize("row", [row_param(r) for r in ROWS])
def test_row_trains_in_cache_mode(tiny_world, tmp_path, shared_cache, row):
    method, *knobs = row
    cache = tmp_path / "ref_cache" if LD in knobs else shared_cache
    run = train_two_steps(tiny_world, tmp_path, method, knobs, ["reference.mode=cache", f"reference.cache_dir={cache}"])
    if isinstance(method, list):  # each component's loss is logged beside the weighted sum
        assert all(sorted(read_scalars(run, f"train/loss_{name}")) == [1, 2] for name in method)
    if LD in knobs:  # the knob's flag made the cache hold the reference's token log-probs
        settings = json.loads(json.loads((cache / INDEX).read_text())["fingerprint"]["settings_detail"])
        assert settings["outputs"] == ["seq_logps", "token_logps"]
    if "method.wpo_weighting=true" in knobs:  # the policy forward computed log Σp²: the weights are logged
        weights = read_scalars(run, "train/wpo_weight")
        assert sorted(weights) == [1, 2] and all(0 < w <= 1 for w in weights.values()), weights


def test_ld_dpo_trains_inline(tiny_world, tmp_path):
    """The inline source serves the token log-probs ld_alpha asks for (no cache is built)."""
    run = train_two_steps(tiny_world, tmp_path, "dpo", [LD, "method.wpo_weighting=true"], ["reference.mode=inline"])
    assert not (run / "ref_cache").exists()
