"""What a run's device allows: optimiser kernel, precision, attention. Pure functions of the config
and two facts about the machine (is there CUDA, is flash-attn importable), so each choice is
tested on CPU (tests/test_device_choices.py) and every caller asks the same function.

    params = optimizer_kernel(cfg.optim.implementation, cuda=True, offload=False)  # {"torch_adam": True, "fused": True}
"""

from __future__ import annotations

from sparsepo.config.sections import ConfigError

HALF_PRECISIONS = ("bf16", "fp16")


def optimizer_kernel(implementation: str, *, cuda: bool, offload: bool = False) -> dict:
    """The DeepSpeed optimizer params that select the AdamW kernel.

    auto: torch's fused AdamW (`torch_adam` + `fused`: one kernel over every tensor, no JIT build) on
    CUDA and on CPU alike: on one CPU thread it stepped a 7.3 M-element partition in 15.6 ms against
    160 ms for torch's default per-tensor loop (71 ms foreach; docs/profile.md). With the optimiser
    state offloaded to CPU (ZeRO-Offload) the plain torch loop, as before. deepspeed_fused (DeepSpeed's
    FusedAdam) JIT-compiles for ~50 s on first use and needs CUDA here."""
    if implementation == "auto":
        implementation = "torch" if offload else "torch_fused"
    if implementation == "deepspeed_fused" and not cuda:
        raise ConfigError("optim.implementation=deepspeed_fused needs a CUDA device and this machine has none: "
                          "set optim.implementation=torch_fused (or auto)")
    if implementation in ("torch_fused", "deepspeed_fused") and offload:
        raise ConfigError(f"optim.implementation={implementation} is not used with a stage file that offloads the "
                          f"optimiser state to CPU memory: set optim.implementation=torch (or auto), or drop "
                          f"offload_optimizer from the stage file")
    if implementation == "torch":
        return {"torch_adam": True}
    if implementation == "torch_fused":
        return {"torch_adam": True, "fused": True}
    if implementation == "deepspeed_fused":
        return {"torch_adam": False}
    raise ConfigError(f"optim.implementation={implementation!r} is not one of auto, torch, torch_fused, deepspeed_fused")


def check_precision(precision: str, *, cuda: bool) -> None:
    """fp16 only where it works: DeepSpeed's CPU accelerator does not support fp16 (FIELD_NOTES:
    'fp32 and bf16 work; fp16 does not') and CPU matmuls in fp16 are emulated."""
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA device: DeepSpeed's CPU accelerator has no fp16 "
                          "support and CPU kernels emulate half-precision matmuls. Use train.precision=bf16 "
                          "(or fp32) on CPU")


def precision_entries(precision: str) -> dict:
    """The bf16 / fp16 sections of the DeepSpeed JSON (fp16: dynamic loss scaling from 2^16)."""
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
            "hysteresis": 2, "min_loss_scale": 1} if precision == "fp16" else {"enabled": False}
    return {"bf16": {"enabled": precision == "bf16"}, "fp16": fp16}


def precision_dtype(precision: str):
    """train.precision -> the torch dtype the model is loaded and computes in (fp32 for anything else)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def attention_kwargs(implementation: str) -> dict:
    """`from_pretrained`'s keyword for model.attn_implementation: none for auto (transformers chooses)."""
    return {} if implementation == "auto" else {"attn_implementation": implementation}


def check_attention(implementation: str, *, cuda: bool, flash_attn: bool) -> None:
    """flash_attention_2 needs CUDA and the flash-attn package; sdpa and eager run everywhere."""
    if implementation != "flash_attention_2":
        return
    if not cuda:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device: use auto (the default), "
                          "sdpa (torch picks its flash kernel on GPUs by itself) or eager")
    if not flash_attn:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn --no-build-isolation), or use auto (the default) or sdpa")


def machine() -> dict:
    """The two facts the checks above need, read from this process (imports torch)."""
    import importlib.util

    import torch

    return {"cuda": torch.cuda.is_available(), "flash_attn": importlib.util.find_spec("flash_attn") is not None}


def check_device(cfg, facts: dict | None = None) -> dict:
    """Every device check of a run config, before anything loads; returns the facts used."""
    facts = machine() if facts is None else facts
    check_precision(cfg.train.precision, cuda=facts["cuda"])
    check_attention(cfg.model.attn_implementation, cuda=facts["cuda"], flash_attn=facts["flash_attn"])
    return facts
