"""Every method row added beside DPO trains from `sparsepo train method.name=<row>` in cache mode:
tiny demo world, one process, two optimizer steps each, finite loss logged at both steps.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_losses_train.py

The DPO-family rows share one reference cache (they ask the reference for the same outputs, so the
cache's fingerprint is the same); cpo and orpo are reference-free and build none.
"""

import math

import pytest

from conftest import read_scalars, run_training

pytestmark = pytest.mark.integration
STEPS = 2
ROWS = [("hinge",), ("robust",), ("exo_pair",), ("nca_pair",), ("bco_pair",), ("sppo_hard",), ("aot",),
        ("aot_pair",), ("apo_zero",), ("apo_down",), ("discopop",), ("sigmoid_norm",), ("cpo",), ("orpo",),
        ("dpo", "method.sft_weight=0.5"), ("simpo", "method.gamma_beta_ratio=0.25")]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ref_cache")


@pytest.mark.parametrize("row", ROWS, ids=["-".join(r) for r in ROWS])
def test_row_trains_in_cache_mode(tiny_world, tmp_path, shared_cache, row):
    method, *knobs = row
    run_training(tiny_world, tmp_path / "run", f"method.name={method}", *knobs, "reference.mode=cache",
                 f"reference.cache_dir={shared_cache}", "train.micro_batch_size=2", f"train.max_steps={STEPS}")
    loss = read_scalars(tmp_path / "run", "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1)), loss
    assert all(math.isfinite(v) for v in loss.values()), loss
