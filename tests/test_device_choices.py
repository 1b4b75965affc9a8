"""The CUDA choices as pure functions, checked on CPU: AdamW kernel, fp16, attention, and the
DeepSpeed JSON they produce (sparsepo/config/device.py, sparsepo/config/ds_json.py)."""

import pytest

from sparsepo.config import ConfigError, build_deepspeed_config, load_config
from sparsepo.config.device import attention_kwargs, check_attention, check_device, check_precision, optimizer_kernel

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("impl, cuda, offload, want", [
    ("auto", True, False, {"torch_adam": True, "fused": True}),   # one fused kernel on GPUs...
    ("auto", False, False, {"torch_adam": True, "fused": True}),  # ...and on CPU (10x the loop), no JIT build
    ("auto", True, True, {"torch_adam": True}),                   # optimiser state offloaded: as before
    ("torch", True, False, {"torch_adam": True}),
    ("torch_fused", False, False, {"torch_adam": True, "fused": True}),
    ("deepspeed_fused", True, False, {"torch_adam": False}),      # DeepSpeed's FusedAdam
])
def test_optimizer_kernel_follows_the_device(impl, cuda, offload, want):
    assert optimizer_kernel(impl, cuda=cuda, offload=offload) == want


@pytest.mark.parametrize("impl, cuda, offload, needle", [
    ("deepspeed_fused", False, False, "needs a CUDA device"),
    ("torch_fused", True, True, "offloads the optimiser state"), ("deepspeed_fused", True, True, "offloads")])
def test_fused_kernels_are_refused_where_they_cannot_run(impl, cuda, offload, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        optimizer_kernel(impl, cuda=cuda, offload=offload)
    assert "optim.implementation=torch" in str(e.value)  # names the fix


def test_deepspeed_json_carries_the_kernel_and_fp16_only_on_cuda():
    cfg = load_config(None, ["train.precision=fp16"])
    ds = build_deepspeed_config(cfg, dp_size=1, cuda=True)
    assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0 and ds["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA device"):
        build_deepspeed_config(cfg, dp_size=1, cuda=False)
    cpu = build_deepspeed_config(load_config(None, ["train.precision=bf16"]), dp_size=1, cuda=False)
    assert cpu["optimizer"]["params"] == {"lr": 5e-6, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                          "torch_adam": True, "fused": True}
    assert cpu["bf16"] == {"enabled": True} and cpu["fp16"] == {"enabled": False}
    offload = build_deepspeed_config(load_config(None, ["deepspeed.stage_file=zero3_offload.json"]), dp_size=1,
                                     cuda=True)
    assert "fused" not in offload["optimizer"]["params"]


def test_precision_and_attention_checks():
    check_precision("fp16", cuda=True)
    check_precision("bf16", cuda=False)
    with pytest.raises(ConfigError, match="DeepSpeed's CPU accelerator has no fp16"):
        check_precision("fp16", cuda=False)
    check_attention("sdpa", cuda=False, flash_attn=False)
    check_attention("eager", cuda=False, flash_attn=False)
    check_attention("flash_attention_2", cuda=True, flash_attn=True)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_attention("flash_attention_2", cuda=False, flash_attn=True)
    with pytest.raises(ConfigError, match="flash-attn package"):
        check_attention("flash_attention_2", cuda=True, flash_attn=False)


def test_run_config_keys_and_defaults():
    cfg = load_config(None, [])
    assert cfg.model.attn_implementation == "auto" and cfg.optim.implementation == "auto"
    assert attention_kwargs("auto") == {} and attention_kwargs("eager") == {"attn_implementation": "eager"}
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(None, ["model.attn_implementation=flash"])
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA device"):
        check_device(load_config(None, ["model.attn_implementation=flash_attention_2"]),
                     {"cuda": False, "flash_attn": True})


def test_the_end_of_run_checkpoint_can_be_turned_off():
    from sparsepo import checkpoint as ckpt

    on, off = load_config(None, []), load_config(None, ["checkpoint.at_end=false"])
    assert ckpt.due(on, 30, 30) and not ckpt.due(off, 30, 30)
    every = load_config(None, ["checkpoint.at_end=false", "checkpoint.every_steps=7"])
    assert ckpt.due(every, 21, 30) and not ckpt.due(every, 30, 30) and not ckpt.due(every, 29, 30)


def test_a_short_write_is_a_full_disk_whatever_space_is_left():
    """torch reports a write that did not fit as a RuntimeError without errno; with GBs still free the
    old rule (errno or < 1 MiB free) re-raised it raw (ZeRO-2's final checkpoint in GPU issue 19)."""
    import errno

    from sparsepo.checkpoint import is_disk_full

    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert is_disk_full(short, 8 << 30)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), 8 << 30)
    assert is_disk_full(RuntimeError("anything"), 1000)
    assert not is_disk_full(RuntimeError("CUDA error: an illegal memory access"), 8 << 30)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), 8 << 30)
