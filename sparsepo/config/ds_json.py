"""DeepSpeed JSON: the stage file under ds_configs/ plus everything the run config decides (batch
arithmetic, optimiser, precision), and the LR schedule handed to the engine beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsepo.config.device import check_precision, optimizer_kernel, precision_entries
from sparsepo.config.sections import ConfigError, RunConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def check_batch_size(cfg: RunConfig, dp_size: int) -> int:
    """train_batch = micro x accumulation x data-parallel size; returns it, refusing a mismatch."""
    t = cfg.train
    product = t.micro_batch_size * t.grad_accum * dp_size
    if t.train_batch_size is not None and t.train_batch_size != product:
        per_step = t.micro_batch_size * dp_size
        fix = f"train.grad_accum={t.train_batch_size // per_step}" if t.train_batch_size % per_step == 0 else (
            f"a train.train_batch_size that train.micro_batch_size x {dp_size} policy ranks = {per_step} divides "
            f"(e.g. {per_step * max(1, round(t.train_batch_size / per_step))}), or another micro_batch_size")
        raise ConfigError(
            f"train.train_batch_size={t.train_batch_size} but train.micro_batch_size={t.micro_batch_size} "
            f"x train.grad_accum={t.grad_accum} x {dp_size} policy ranks = {product}. Set "
            f"train.train_batch_size={product}, or {fix}."
        )
    return product



def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{path}.{k}" if path else k)
            if found:
                return found
    elif isinstance(node, str) and node.strip().lower() == "auto":
        return path
    return None


def load_stage_file(name: str) -> tuple[dict, Path]:
    path = Path(name)
    if not path.is_file():
        path = DS_CONFIG_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(
            f"deepspeed.stage_file '{name}' not found (looked in the working directory and {DS_CONFIG_DIR}). "
            f"Available: {', '.join(available)}"
        )
    try:
        stage = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    auto = _find_auto(stage)
    if auto:
        raise ConfigError(
            f"{path}: '{auto}' is \"auto\"; plain DeepSpeed silently drops \"auto\" values. "
            f"Give a number, or remove the key so sparsepo fills it from the run config."
        )
    return stage, path


def offloads_optimizer(stage: dict) -> bool:
    device = ((stage.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


def build_deepspeed_config(cfg: RunConfig, *, dp_size: int, cuda: bool | None = None) -> dict:
    """The JSON handed to deepspeed.initialize for the policy engine. The LR schedule is not in it:
    the engine gets a transformers schedule object (see lr_schedule), which DeepSpeed checkpoints.
    `cuda`: whether the policy runs on a GPU (default: torch says); it picks the AdamW kernel and
    allows fp16 (sparsepo.config.device)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    stage, _ = load_stage_file(cfg.deepspeed.stage_file)
    o, t = cfg.optim, cfg.train
    check_precision(t.precision, cuda=cuda)
    kernel = optimizer_kernel(o.implementation, cuda=cuda, offload=offloads_optimizer(stage))
    ds = dict(stage)
    ds.update({
        "train_batch_size": check_batch_size(cfg, dp_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip,
        **precision_entries(t.precision),
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                  "weight_decay": o.weight_decay, **kernel}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    if ((stage.get("checkpoint") or {}).get("writer") or {}).get("decoupled"):
        raise ConfigError(f"deepspeed.stage_file {cfg.deepspeed.stage_file}: checkpoint.writer.decoupled is set there; "
                          f"sparsepo seals a checkpoint only once its files are written, so ask for it with "
                          f"checkpoint.async_write=true instead (and remove the writer entry)")
    if cfg.checkpoint.async_write:  # DeepSpeed's decoupled engine with its plain-Python file writer
        ds["checkpoint"] = {**stage.get("checkpoint", {}), "writer": {"type": "python", "decoupled": True}}
    return ds


def warmup_steps(cfg: RunConfig, total_steps: int) -> int:
    """optim.warmup_steps, or ceil(optim.warmup_ratio × total_steps) as transformers computes it."""
    import math

    return cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total_steps)


def schedule_depends_on_length(cfg: RunConfig) -> bool:
    """Whether the LR at a given step changes with the run's total length."""
    return cfg.optim.schedule != "constant" or cfg.optim.warmup_ratio > 0


def lr_schedule(cfg: RunConfig, total_steps: int) -> tuple[str, dict]:
    """(transformers scheduler name, kwargs) for `transformers.get_scheduler`."""
    o = cfg.optim
    kwargs = {"num_warmup_steps": warmup_steps(cfg, total_steps), "num_training_steps": total_steps}
    if o.schedule == "constant":
        return "constant_with_warmup", kwargs
    if o.schedule == "linear":
        return "linear", kwargs
    return "cosine_with_min_lr", {**kwargs, "scheduler_specific_kwargs": {"min_lr_rate": o.min_lr_ratio}}
