"""LoRA under every method of the loss table (issue 20), on the tiny demo world, CPU:

* a method that reads the reference: 2 steps inline (the reference = the policy with its adapters
  switched off) and 2 steps cache (the base model scored beforehand) log the same losses, and step 1
  is the loss of a policy equal to its reference;
* a reference-free method: 2 steps train the adapters (lora_B moves off its zero init), finite losses.

SePO (an oracle), FPO (an SAE) and SPO (policy samples) with LoRA have their own runs in docs/lora.md.
About 40 short trainings: slow-marked.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q -m slow tests/test_lora_methods.py
"""

from __future__ import annotations

import math

import pytest

from conftest import read_scalars, run_training
from sparsepo.losses import METHODS
from test_lora_train import CONSTANT, LORA, adapter_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]
OWN_RUNS = ("fpo", "sepo", "spo")  # need an SAE, an oracle or policy samples: docs/lora.md
WITH_REFERENCE = sorted(n for n, s in METHODS.items() if s.needs_reference and n not in OWN_RUNS)
REFERENCE_FREE = sorted(n for n, s in METHODS.items() if not s.needs_reference and n not in OWN_RUNS)
COMMON = ("train.micro_batch_size=4", "train.max_steps=2", "optim.lr=1e-2", *CONSTANT, *LORA)


def test_the_lists_cover_the_table():
    assert set(WITH_REFERENCE) | set(REFERENCE_FREE) | set(OWN_RUNS) == set(METHODS)
    assert "dpo" in WITH_REFERENCE and "simpo" in REFERENCE_FREE


@pytest.mark.parametrize("method", WITH_REFERENCE)
def test_inline_adapters_off_equals_the_cached_base(tiny_world, tmp_path, method):
    losses = {}
    for mode in ("inline", "cache"):
        run_training(tiny_world, tmp_path / mode, f"method.name={method}", f"reference.mode={mode}", *COMMON)
        losses[mode] = read_scalars(tmp_path / mode, "train/loss")
    assert sorted(losses["inline"]) == sorted(losses["cache"]) == [1, 2], losses
    for step in (1, 2):
        assert losses["inline"][step] == pytest.approx(losses["cache"][step], abs=1e-5), (method, losses)
    assert all(math.isfinite(v) for v in losses["inline"].values())
    assert losses["inline"][2] != pytest.approx(losses["inline"][1], abs=1e-7), (method, losses)  # the adapters moved


@pytest.mark.parametrize("method", REFERENCE_FREE)
def test_reference_free_methods_train_the_adapters(tiny_world, tmp_path, method):
    run_training(tiny_world, tmp_path, f"method.name={method}", "reference.mode=cache", *COMMON)
    losses = read_scalars(tmp_path, "train/loss")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses
    adapters = adapter_params(tmp_path)
    assert any(".lora_B." in k for k in adapters)
    assert all(float(v.abs().max()) > 0 for k, v in adapters.items() if ".lora_B." in k), method  # zero at init
