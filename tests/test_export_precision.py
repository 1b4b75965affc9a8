"""A bf16 run's export equals its final/ (the bf16 model DeepSpeed trained), bit for bit; the fp32
master on request (`--fp32-master`) differs from it by at most half a bf16 ulp — the gap that an
fp32-only export used to leave undocumented (up to 2.4e-4 per parameter).

    PYTHONPATH=$PWD python -m pytest -q tests/test_export_precision.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_training, train_env


@pytest.mark.slow  # ~45 s; the dtype choice itself is covered in test_export.py (unit)
def test_a_bf16_runs_export_equals_its_final_model(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "bf16"
    run_training(tiny_world, run, "train.precision=bf16", "train.max_steps=2", "train.micro_batch_size=2",
                 "checkpoint.every_steps=2", "method.name=simpo", "optim.warmup_steps=0")
    tag = run / "checkpoints" / "step-00000002"
    for name, flag in (("bf16", []), ("fp32", ["--fp32-master"])):
        subprocess.run([sys.executable, "-m", "sparsepo.cli", "export", str(tag), str(tmp_path / name), *flag],
                       env=train_env(), cwd=REPO, check=True, capture_output=True)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype="auto").state_dict()  # noqa: E731
    final, bf16, fp32 = load(run / "final"), load(tmp_path / "bf16"), load(tmp_path / "fp32")
    assert final.keys() == bf16.keys() and all(v.dtype == torch.bfloat16 for v in final.values())
    assert all(torch.equal(bf16[k], final[k]) for k in final)
    assert all(fp32[k].dtype == torch.float32 and torch.equal(fp32[k].to(torch.bfloat16), final[k]) for k in final)
    gap = max((fp32[k] - final[k].float()).abs().max().item() for k in final)
    assert 0 < gap, "the fp32 master rounds to final/ but is not final/ itself: the choice matters"
