"""LoRA / QLoRA adapters on the policy, built on `peft` (config: the `lora:` section, docs/lora.md).

    peft_model = wrap(model, cfg.lora)        # peft.get_peft_model; only the adapters train
    engine_module = peft_model.get_base_model()   # what DeepSpeed wraps: the HF model, adapters injected
    with adapters_off(peft_model): ...        # the base model: the inline reference, no second copy
    merged = merged_model(base_path, cfg.lora, adapter_state)   # peft's merge_and_unload

DeepSpeed wraps the Hugging Face model with the adapter layers injected in place (not the
`PeftModel` around it), so every path that reads the model's layout — the lean log-prob head, the
SAE hooks, generation — sees the usual `*ForCausalLM`. Parameter names are then the HF model's own
with peft's infixes (`...q_proj.lora_A.default.weight`, `...q_proj.base_layer.weight`), the same in
a checkpoint and in a fresh `get_peft_model` of the base, which is how export rebuilds the model.

No deepspeed import here (only `sparsepo.engine` imports it).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from sparsepo.lean_imports import bitsandbytes_offline

log = logging.getLogger("sparsepo")

ADAPTER_INFIXES = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector",
                   ".modules_to_save.")
"""Substrings of the parameter names peft trains (the adapters and `modules_to_save` copies)."""


class LoraUnavailable(RuntimeError):
    """A LoRA setting this machine cannot run (4-bit without a bitsandbytes that runs NF4 here)."""


def enabled(lcfg) -> bool:
    return lcfg is not None and lcfg.r > 0


def peft_config(lcfg):
    """The `peft.LoraConfig` of a `lora:` section (empty target_modules: every linear layer but the head)."""
    peft = import_peft()
    return peft.LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, bias="none",
                           target_modules=list(lcfg.target_modules) or "all-linear",
                           modules_to_save=list(lcfg.modules_to_save) or None, task_type=peft.TaskType.CAUSAL_LM)


def import_peft():
    """peft, with bitsandbytes imported first without its Hub request (peft imports it whenever it is
    installed: ``lean_imports.bitsandbytes_offline``)."""
    bitsandbytes_offline()
    import peft

    return peft


def import_bitsandbytes():
    """bitsandbytes, imported without its CPU backend's Hub request (``lean_imports.bitsandbytes_offline``)."""
    bitsandbytes_offline()
    import bitsandbytes

    return bitsandbytes


def qlora_problem(device: str) -> str | None:
    """Why 4-bit NF4 cannot run on ``device`` ("cpu" or "cuda") here, or None: bitsandbytes missing,
    or, on CPU, one that cannot quantise and dequantise a block there (older ones had no CPU backend).
    On CUDA only the import is checked: a trial there would open a CUDA context in the launcher."""
    try:
        bnb = import_bitsandbytes()
    except ImportError:
        return "lora.load_in_4bit=true needs the bitsandbytes package: pip install bitsandbytes (or set lora.load_in_4bit=false)"
    if device != "cpu":
        return None
    try:
        x = torch.linspace(-1, 1, 64, dtype=torch.bfloat16, device=device)
        q, state = bnb.functional.quantize_4bit(x, quant_type="nf4", quant_storage=torch.bfloat16)
        bnb.functional.dequantize_4bit(q, state)
    except Exception as e:  # noqa: BLE001 - any failure means this bitsandbytes cannot run NF4 on this device
        return (f"lora.load_in_4bit=true: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit NF4 on "
                f"{device} ({type(e).__name__}: {str(e)[:200]}); install bitsandbytes>=0.50 (CPU support) or set "
                f"lora.load_in_4bit=false")
    return None


def check_runnable(cfg) -> str | None:
    """Why this machine cannot run cfg.lora (QLoRA: bitsandbytes able to run NF4 on the run's device), or
    None. Called before anything loads, so the refusal is a config error naming the key."""
    lo = getattr(cfg, "lora", None)
    if not enabled(lo) or not lo.load_in_4bit:
        return None
    import os

    cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    return qlora_problem("cpu" if cpu else "cuda")


def quantization_config(lcfg, precision: str = "bf16"):
    """transformers' BitsAndBytesConfig for QLoRA (NF4, double quantisation), or None. The layers compute
    in the run's ``precision`` and the 4-bit codes are stored in tensors of that dtype, so ZeRO-3
    partitions them like the model's other weights and a dtype cast never touches them."""
    if not enabled(lcfg) or not lcfg.load_in_4bit:
        return None
    try:
        import_bitsandbytes()
    except ImportError as e:
        raise LoraUnavailable("lora.load_in_4bit=true needs bitsandbytes (pip install bitsandbytes); or set "
                              "lora.load_in_4bit=false") from e
    from transformers import BitsAndBytesConfig

    from sparsepo.config.device import precision_dtype

    dtype = precision_dtype(precision)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def count_4bit(model) -> int:
    """How many of ``model``'s layers hold 4-bit weights (bitsandbytes' ``Linear4bit``)."""
    linear4bit = import_bitsandbytes().nn.Linear4bit
    return sum(isinstance(m, linear4bit) for m in model.modules())


def portable_4bit(model):
    """Keep every 4-bit layer of ``model`` in the one weight layout it was loaded in. On a CPU with
    AVX512-bf16, bitsandbytes re-packs a 4-bit weight in place the first time it runs in eval mode
    without gradients (an inference-only layout). Under ZeRO-3 the re-packed tensor is thrown away when
    the parameter is released while its quant state keeps saying "re-packed": every later forward read
    garbage (measured: logits off by 0.8 after one reference forward). Returns ``model``."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def wrap(model, lcfg, *, gradient_checkpointing: bool = False):
    """peft's `get_peft_model` around `model`: the base frozen, the adapters (and modules_to_save)
    trainable. QLoRA first prepares the 4-bit base (peft's prepare_model_for_kbit_training)."""
    peft = import_peft()
    if lcfg.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        peft_model = peft.get_peft_model(model, peft_config(lcfg))
    except ValueError as e:  # peft names the target modules it could not find
        raise ValueError(f"lora.target_modules / lora.modules_to_save do not fit {type(model).__name__}: {e}") from e
    if gradient_checkpointing:  # the frozen embeddings give no input that requires grad: checkpointed blocks need one
        peft_model.get_base_model().enable_input_require_grads()
    return peft_model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) elements of the full model (ZeRO-3 partitions counted at their full size)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


@contextmanager
def adapters_off(peft_model):
    """The base model for the body: every adapter layer (and modules_to_save copy) bypassed, exactly
    the base weights' forward (peft's `disable_adapter`); the adapters are back on after it."""
    with peft_model.disable_adapter():
        yield


class AdaptersOff:
    """The policy with its adapters switched off, as a frozen reference for scoring (inline mode):
    calling it runs the engine's HF module under `adapters_off` and no_grad. `.module` is that HF
    module, so scoring code that looks for the model's layout (lean head, SAE hooks) finds it."""

    def __init__(self, peft_model, module):
        self.peft_model, self.module = peft_model, module

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), adapters_off(self.peft_model):
            return self.module(*args, **kwargs)


def is_adapter_key(name: str) -> bool:
    return any(infix in name for infix in ADAPTER_INFIXES)


def peft_from_state(base_path: str, lcfg, state: dict, *, dtype: torch.dtype = torch.float32):
    """A fresh PeftModel: the base loaded from `base_path`, wrapped as training wrapped it, the trained
    adapter weights from `state` (names as the engine's module has them; base weights in `state`
    are ignored: the base is frozen). Refuses a state that lacks an adapter or holds foreign ones."""
    from transformers import AutoModelForCausalLM

    from dataclasses import replace

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    peft_model = wrap(base, replace(lcfg, load_in_4bit=False))  # QLoRA's adapters go onto the unquantised base
    inner = peft_model.get_base_model()
    wanted = {n for n, p in inner.named_parameters() if p.requires_grad}
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    missing, foreign = sorted(wanted - set(adapters)), sorted(set(adapters) - wanted)
    if missing or foreign:
        raise ValueError(f"the adapter weights do not match lora={lcfg} on {base_path}: missing {missing[:3]}, "
                         f"unexpected {foreign[:3]}")
    with torch.no_grad():
        params = dict(inner.named_parameters())
        for name, value in adapters.items():
            params[name].copy_(value.to(params[name].dtype))
    return peft_model


def save_merged(base_path: str, lcfg, state: dict, out_dir, *, tokenizer=None, dtype: torch.dtype = torch.float32,
                adapter_subdir: str | None = "adapter", merge: bool = True) -> None:
    """Write `out_dir`: the base with the adapters of `state` merged (peft's merge_and_unload), a plain
    Hugging Face model, plus the PEFT adapter directory in `out_dir/adapter_subdir` (None: none);
    `merge=False`: only the adapter directory, in `out_dir` itself (`PeftModel.from_pretrained` loads it)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model = peft_from_state(base_path, lcfg, state, dtype=dtype)
    if adapter_subdir is not None or not merge:
        peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
        peft_model.save_pretrained(str(out if not merge else out / adapter_subdir), safe_serialization=True)
    if merge:
        peft_model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
