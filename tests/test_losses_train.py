"""Every method row added beside DPO (and a combination, method.name=[dpo, sft]) trains in cache
mode: `sparsepo train` on the demo recipe re-targeted at the row (`sparsepo.recipe.for_method`, as
`sparsepo demo --method` does), tiny demo world, one process, two optimizer steps, finite loss logged
at both steps.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_losses_train.py

The DPO-family rows share one reference cache (they ask the reference for the same outputs, so the
cache's fingerprint is the same); cpo, orpo and sft are reference-free and build none.
"""

import math
import subprocess

import pytest

from conftest import RECIPE, REPO, read_scalars, train_command, train_env
from sparsepo.recipe import write_for_method

pytestmark = pytest.mark.integration
STEPS = 2
ROWS = [("hinge",), ("robust",), ("exo_pair",), ("nca_pair",), ("bco_pair",), ("sppo_hard",), ("aot",),
        ("aot_pair",), ("apo_zero",), ("apo_down",), ("discopop",), ("sigmoid_norm",), ("cpo",), ("orpo",),
        ("sft",), ("dpo", "method.sft_weight=0.5"), ("simpo", "method.gamma_beta_ratio=0.25"),
        (["dpo", "sft"], "method.weights=[1.0,0.1]")]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ref_cache")


def row_id(row):
    method, *knobs = row
    return "+".join(method) if isinstance(method, list) else "-".join([method, *knobs])


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_row_trains_in_cache_mode(tiny_world, tmp_path, shared_cache, row):
    method, *knobs = row
    recipe = write_for_method(RECIPE, method, tmp_path / "recipe.yaml")
    run = tmp_path / "run"
    cmd = train_command(recipe, [f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                                 f"logging.output_dir={run}", "logging.progress=false", "logging.log_every=1",
                                 *knobs, "reference.mode=cache", f"reference.cache_dir={shared_cache}",
                                 "train.micro_batch_size=2", f"train.max_steps={STEPS}"])
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    loss = read_scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1)), loss
    assert all(math.isfinite(v) for v in loss.values()), loss
    if isinstance(method, list):  # each component's loss is logged beside the weighted sum
        assert all(sorted(read_scalars(run, f"train/loss_{name}")) == [1, 2] for name in method)
