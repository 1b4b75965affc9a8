"""The `lora:` section (LoRA / QLoRA adapters through `peft`) and its checks. No peft import here:
the adapters themselves are built in `sparsepo.lora`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class LoraConfig:
    r: int = 0
    """Adapter rank; 0 = off (full fine-tuning). TRL's `peft_config=LoraConfig(r=...)`, OpenRLHF's
    `--lora_rank`. With r > 0 only the adapters (and `modules_to_save`) train; the inline reference
    is the same model with the adapters switched off; checkpoints hold the adapters; final/ and
    `sparsepo export` merge them (docs/lora.md)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) · B A (peft's `lora_alpha`)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's `lora_dropout`)."""
    target_modules: list[str] = field(default_factory=list)
    """peft module names to adapt (e.g. [q_proj, v_proj]); empty = every linear layer of the decoder,
    not the lm_head (peft's "all-linear")."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (peft's `modules_to_save`)."""
    load_in_4bit: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes >= 0.50: CUDA and CPU), its layers computing in
    train.precision (bf16 is QLoRA's usual choice; fp32 for exact comparisons); the reference is that
    4-bit base in every mode (docs/lora.md)."""


def check_lora(cfg, source: str) -> str | None:
    """The problem with cfg.lora in this run, as one line naming the key and the fix; None if it can run."""
    lo = cfg.lora
    if lo.r < 0:
        return f"lora.r={lo.r} in {source} must be >= 0 (0 turns LoRA off)"
    if lo.r == 0:
        if lo.load_in_4bit or lo.target_modules or lo.modules_to_save:
            return (f"lora.load_in_4bit / target_modules / modules_to_save are set in {source} but lora.r=0 "
                    f"(LoRA off): set lora.r (e.g. 16) or drop them")
        return None
    if lo.alpha <= 0:
        return f"lora.alpha={lo.alpha} in {source} must be > 0"
    if not 0.0 <= lo.dropout < 1.0:
        return f"lora.dropout={lo.dropout} in {source} must be in [0, 1)"
    for key in ("target_modules", "modules_to_save"):
        bad = [m for m in getattr(lo, key) if not isinstance(m, str) or not m]
        if bad:
            return f"lora.{key} in {source} must be a list of module names, got {bad[0]!r}"
    return None
