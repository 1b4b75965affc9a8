"""QLoRA end to end on the tiny demo world (`lora.load_in_4bit=true`: the frozen base in 4-bit NF4 through
bitsandbytes, which runs NF4 on CPU from 0.50; the real launcher, gloo): one step equals the same step
computed by hand with transformers + peft + bitsandbytes; the reference is the 4-bit base in every mode
(inline's adapters-off view, the cache, the live group), so step 1 is ln 2 and the curves agree; ZeRO-3 on
2 ranks equals 1 rank; resume continues the curve; export merges the adapters into the unquantised base.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_qlora_train.py -m "slow or not slow"
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import RECIPE, read_scalars, run_training
from test_lora_train import CONSTANT, adapter_params, first_step_by_hand, one_step_run

pytestmark = pytest.mark.integration
QLORA = ("lora.r=4", "lora.alpha=8", "lora.load_in_4bit=true")
COMMON = ("method.name=dpo", "train.micro_batch_size=4", "train.max_steps=3", "optim.lr=1e-2", *CONSTANT, *QLORA)
BF16 = ("train.precision=bf16",)  # QLoRA's usual compute dtype; fp32 (the layers dequantise to fp32) for exact checks


@pytest.fixture(scope="module")
def cache_run(tiny_world, tmp_path_factory):
    """3 QLoRA DPO steps in bf16 with the reference cache (scored by the 4-bit base), a checkpoint at step 2."""
    run = tmp_path_factory.mktemp("qlora-cache")
    proc = run_training(tiny_world, run, *COMMON, *BF16, "reference.mode=cache", "checkpoint.every_steps=2")
    return run, proc.stdout + proc.stderr


def test_cache_reference_is_the_4bit_base(cache_run):
    """Step 1 is ln 2 only if the cached reference is the policy's 4-bit base (a bf16 base scores
    differently: the margin is off by the quantisation error); later steps move, nothing is NaN (the
    4-bit codes sit in bf16 tensors whose bytes read as NaN: the guard must not count them)."""
    run, out = cache_run
    loss = read_scalars(run, "train/loss")
    assert sorted(loss) == [1, 2, 3]
    assert loss[1] == pytest.approx(math.log(2), abs=1e-6), loss
    assert abs(loss[3] - math.log(2)) > 1e-3 and all(math.isfinite(v) for v in loss.values()), loss
    assert "QLoRA: the base in 4-bit NF4" in out
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "final" / "model.safetensors").is_file()


def test_the_4bit_reference_keys_its_own_cache(tiny_world):
    from sparsepo.config import load_config
    from sparsepo.reference_role.offline import cache_settings

    base = [f"model.path={tiny_world.sft_dir}", "lora.r=4"]
    plain = cache_settings(load_config(RECIPE, base), ("seq_logps",))
    quant = cache_settings(load_config(RECIPE, [*base, "lora.load_in_4bit=true"]), ("seq_logps",))
    assert "reference_quantized" not in plain and quant["reference_quantized"] == "nf4-double-quant"


@pytest.mark.slow  # the default suite keeps the LoRA by-hand step (same trainer path) and the 4-bit cache test
def test_one_qlora_step_equals_the_step_by_hand(tiny_world, tmp_path):
    """DPO, 2 pairs, one step, ZeRO-3, inline reference. As tests/test_lora_train.py's LoRA step: B = 0 at
    init, so the step moves lora_B by AdamW's first step -lr·g/(|g|+eps); g by hand from transformers'
    4-bit model (the same BitsAndBytesConfig), peft's adapters with the run's lora_A, the reference under
    disable_adapter, the DPO loss written out. fp32 compute (the 4-bit weights dequantised to fp32) on both
    sides."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sparsepo import lora
    from sparsepo.config.lora import LoraConfig as SectionConfig

    lr, eps, beta = 1e-2, 1.0, 0.1
    trained, batch = one_step_run(tiny_world, tmp_path, QLORA, lr=lr, eps=eps, beta=beta)
    quant = lora.quantization_config(SectionConfig(r=4, load_in_4bit=True), "fp32")
    base = lora.portable_4bit(AutoModelForCausalLM.from_pretrained(tiny_world.sft_dir, dtype=torch.float32,
                                                                   quantization_config=quant))
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            key = name.replace(".weight", ".default.weight")
            params[key].copy_(value if ".lora_A." in name else torch.zeros_like(value))

    first_step_by_hand(model, batch, beta, trained, lr=lr, eps=eps)
    assert read_scalars(tmp_path / "run", "train/loss")[1] == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "live"])
def test_inline_and_live_give_the_cache_curve(tiny_world, cache_run, tmp_path, mode):
    """The adapters-off view (inline) and the live group's 4-bit stages score as the cache does."""
    live = ("topology.reference_ranks=1",) if mode == "live" else ()
    run_training(tiny_world, tmp_path, *COMMON, *BF16, f"reference.mode={mode}", *live, nproc=2 if live else 1)
    got, want = read_scalars(tmp_path, "train/loss"), read_scalars(cache_run[0], "train/loss")
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)


@pytest.mark.slow
def test_zero3_on_two_ranks_matches_one_rank(tiny_world, tmp_path):
    """The 4-bit base partitioned over 2 ranks (ZeRO-3), micro 2 each, against 1 rank with micro 4: the
    same curve and adapters, in fp32 (in bf16 the two reduction orders round apart: ~1e-3 in the loss by
    step 3, for plain LoRA too)."""
    common = (*COMMON, "reference.mode=inline")
    run_training(tiny_world, tmp_path / "one", *common)
    run_training(tiny_world, tmp_path / "two", *common, "train.micro_batch_size=2", nproc=2)
    got, want = read_scalars(tmp_path / "two", "train/loss"), read_scalars(tmp_path / "one", "train/loss")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=2e-5), (step, got, want)
    a, b = adapter_params(tmp_path / "two"), adapter_params(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_resume_continues_the_same_curve(tiny_world, cache_run, tmp_path):
    """Resume from the cache run's step-2 checkpoint (adapters + their Adam state; the base is re-quantised
    from the model files, deterministically) to step 3: the uninterrupted curve and adapters."""
    import shutil

    run, _ = cache_run
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002")
    for step in [d for d in (tmp_path / "checkpoints").iterdir() if d.name.startswith("step-00000003")]:
        shutil.rmtree(step)
    run_training(tiny_world, tmp_path, *COMMON, *BF16, "reference.mode=cache", "checkpoint.every_steps=2",
                 resume="auto")
    got, want = read_scalars(tmp_path, "train/loss"), read_scalars(run, "train/loss")
    assert got[3] == pytest.approx(want[3], abs=1e-7), (got, want)
    a, b = adapter_params(tmp_path), adapter_params(run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)
