"""SePO end to end on the tiny demo world (one process each): `train-oracle`, then the selective
policy run in cache mode and in inline mode. These launch real training processes.

Run: OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_sepo_train.py -q
"""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, RECIPE, read_scalars, train_command, train_env

pytestmark = pytest.mark.integration
STEPS = 8


def quiet_launch(config, overrides, *, nproc=1):
    """`sparsepo.cli.launch_train` with the test environment, its output kept for a failure."""
    cmd = train_command(config, [*overrides, "logging.progress=false", "logging.log_every=1"], nproc=nproc)
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc.returncode


@pytest.fixture(scope="module")
def oracle(tiny_world, tmp_path_factory):
    from sparsepo.oracle_train import train_oracle

    out = tmp_path_factory.mktemp("oracle")
    manifest = train_oracle(str(RECIPE), out, launch=quiet_launch, fraction=0.5, seed=0,
                            overrides=[f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                                       "train.epochs=3", "optim.lr=1e-3"])
    return out, manifest


@pytest.fixture(scope="module")
def pairs8(tiny_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(tiny_world.train_path.read_text().splitlines(keepends=True)[:8]))
    return path


def sepo_run(world, run_dir, oracle_dir, pairs, mode):
    """The demo recipe re-targeted at SePO (its DPO beta dropped); 8 pairs = 2 steps of 4 per epoch,
    STEPS/2 epochs fit them. The tiny world's responses are short: the authors' 8-token filter
    (tests/test_sepo_filters.py) is turned off so that all 8 pairs train."""
    from sparsepo.recipe import write_for_method

    recipe = write_for_method(RECIPE, "sepo", run_dir.parent / f"{run_dir.name}-recipe.yaml")
    cmd = train_command(recipe, [f"model.path={world.sft_dir}", f"logging.output_dir={run_dir}",
                                 "logging.progress=false", "logging.log_every=1", f"reference.oracle={oracle_dir}",
                                 f"data.path={pairs}", f"reference.mode={mode}", "train.micro_batch_size=4",
                                 f"train.epochs={STEPS // 2}", "optim.lr=2e-3", "optim.schedule=constant",
                                 "optim.warmup_steps=0", "method.min_response_tokens=0"])
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def cached(tiny_world, oracle, pairs8, tmp_path_factory):
    run = tmp_path_factory.mktemp("sepo_cache")
    proc = sepo_run(tiny_world, run, oracle[0], pairs8, "cache")
    return run, proc.stdout + proc.stderr


def test_train_oracle_writes_its_manifest(oracle, tiny_world):
    out, manifest = oracle
    on_disk = json.loads((out / "oracle.json").read_text())
    assert on_disk == manifest
    assert on_disk["oracle"] == str(out / "run" / "final") and on_disk["reference"] == str(tiny_world.sft_dir)
    assert on_disk["fraction"] == 0.5 and on_disk["heldout_pairs"] == 32
    assert 0.0 <= on_disk["heldout_accuracy"] <= 1.0
    # the seeded split: 32 + 32 distinct pairs, all from the world's data
    train = (out / "data.jsonl").read_text().splitlines()
    held = (out / "heldout.jsonl").read_text().splitlines()
    assert len(train) == len(held) == 32 and not set(train) & set(held)
    # a normal DPO run of our trainer: its resolved config, TensorBoard and summary
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["steps"] == 12
    assert len(read_scalars(out / "run", "train/loss")) == 12


def test_sepo_loss_decreases_and_logs_oracle_scores(cached):
    run, log = cached
    loss = read_scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 0.1, loss
    sel, unsel = read_scalars(run, "train/oracle_chosen_selected"), read_scalars(run, "train/oracle_chosen_unselected")
    assert all(sel[s] > unsel[s] for s in sel), (sel, unsel)  # top-ρ chosen tokens score above the rest
    rsel, runsel = read_scalars(run, "train/oracle_rejected_selected"), read_scalars(run, "train/oracle_rejected_unselected")
    assert all(rsel[s] < runsel[s] for s in rsel), (rsel, runsel)
    frac = read_scalars(run, "train/selected_fraction")
    assert all(0.1 < v < 0.35 for v in frac.values()), frac  # floor(0.3·(|y|−1)) of |y|, min 1
    index = json.loads((run / "ref_cache" / "index.json").read_text())
    assert "oracle_reference" in index["fingerprint"]["settings_detail"]
    assert "SePO oracle pair" in log


def test_inline_oracle_matches_the_cache(tiny_world, oracle, pairs8, cached, tmp_path):
    sepo_run(tiny_world, tmp_path, oracle[0], pairs8, "inline")
    assert not (tmp_path / "ref_cache").exists()
    inline, cache = read_scalars(tmp_path, "train/loss"), read_scalars(cached[0], "train/loss")
    assert sorted(inline) == sorted(cache) == list(range(1, STEPS + 1))
    for step in cache:
        assert inline[step] == pytest.approx(cache[step], abs=2e-5), (step, inline, cache)


def test_sepo_without_an_oracle_is_refused(tiny_world, tmp_path):
    cmd = train_command(None, [f"model.path={tiny_world.sft_dir}", f"logging.output_dir={tmp_path}", "method.name=sepo"])
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "reference.oracle" in proc.stderr and "sparsepo sepo train-oracle" in proc.stderr, proc.stderr


def test_train_oracle_stores_a_relative_start_model_as_an_absolute_path(tiny_world, tmp_path, monkeypatch):
    """`sparsepo demo --method sepo` passes its small SFT model relative to the working directory
    (runs/demo/world/sft-small); the manifest must name it absolutely, or a run reading it resolves it
    beside the manifest and fails (found on a fresh clone). The DPO run itself is faked: a copy."""
    import shutil

    from sparsepo.oracle_train import train_oracle
    from sparsepo.reference.oracle import read_manifest

    def fake_launch(config, overrides, *, nproc=1):
        out = next(o.split("=", 1)[1] for o in overrides if o.startswith("logging.output_dir="))
        shutil.copytree(tiny_world.sft_dir, Path(out) / "final")
        return 0

    monkeypatch.chdir(tiny_world.sft_dir.parent)
    manifest = train_oracle(str(RECIPE), tmp_path / "oracle", launch=fake_launch, fraction=0.5, seed=0,
                            model=tiny_world.sft_dir.name, overrides=[f"data.path={tiny_world.train_path}"])
    assert manifest["reference"] == str(tiny_world.sft_dir.resolve())
    monkeypatch.chdir(tmp_path)  # another working directory
    assert read_manifest(tmp_path / "oracle").reference == str(tiny_world.sft_dir.resolve())
