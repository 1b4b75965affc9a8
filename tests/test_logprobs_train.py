"""The lean log-prob path end to end: a short DPO and a TDPO2 run (inline reference, so the
reference's scoring takes the same path as the policy's forward) log the same loss curve with
model.logits_chunk on (a chunk that leaves a short last chunk) and off (0: full logits).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_logprobs_train.py
"""

import pytest

from conftest import RECIPE, REPO, read_scalars, train_command, train_env
from sparsepo.recipe import write_for_method

pytestmark = pytest.mark.integration
STEPS = 4


@pytest.mark.parametrize("method", ["dpo", pytest.param("tdpo2", marks=pytest.mark.slow)])  # a training per row
def test_loss_curve_is_the_same_with_and_without_chunks(tiny_world, tmp_path, method):
    import subprocess

    recipe = write_for_method(RECIPE, method, tmp_path / "recipe.yaml")
    curves = {}
    for chunk in (0, 5):
        run = tmp_path / f"run{chunk}"
        cmd = train_command(recipe, [f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                                     f"logging.output_dir={run}", "logging.progress=false", "logging.log_every=1",
                                     "reference.mode=inline", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
                                     f"model.logits_chunk={chunk}"])
        proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        curves[chunk] = read_scalars(run, "train/loss")
    assert sorted(curves[0]) == list(range(1, STEPS + 1)), curves
    assert curves[0].keys() == curves[5].keys()
    for step in curves[0]:
        assert abs(curves[5][step] - curves[0][step]) <= 1e-5, (step, curves)
    assert len({round(v, 6) for v in curves[0].values()}) > 1  # the policy moved: a curve, not one number
