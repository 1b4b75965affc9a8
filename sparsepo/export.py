"""`sparsepo export CHECKPOINT OUT`: a sharded training checkpoint -> a Hugging Face model directory.

CHECKPOINT is a checkpoint directory (`<run>/checkpoints/step-00000020`), or a run directory /
its checkpoints/ directory (then its newest valid checkpoint; newer damaged ones are named in the
result, on stdout and in OUT/sparsepo_export.json). The checkpoint's sparsepo.json names the model
it started from; its architecture and tokenizer are reused, the weights come from DeepSpeed's
zero-to-fp32 consolidation of the shards (the fp32 master weights). They are written in the
training precision: a bf16 run's export holds bf16 weights, the master weights rounded as DeepSpeed
rounds them into the bf16 model, so they equal the run's `final/` bit for bit;
`sparsepo export --fp32-master` (`fp32_master=True`) writes the fp32 master weights instead (they
differ from the bf16 model by up to half a bf16 ulp per parameter). Runs on one process, no
torch.distributed.

A LoRA run's checkpoint holds only the adapters: they are merged into the base model it started
from (peft's merge_and_unload: a plain Hugging Face model), or with `--adapter-only` written as the
PEFT adapter directory (`PeftModel.from_pretrained(base, OUT)` loads it). See docs/lora.md.

Checkpoints written before config loading made local paths absolute record model.path as it was
typed (relative to the training run's working directory). That directory is recovered from where
the run directory sits: logging.output_dir was recorded relative to the same working directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sparsepo.atomic import atomic_write
from sparsepo.checkpoint import META, CheckpointError, is_valid, list_tags, resolve, step_of
from sparsepo.model_card import write_model_card

log = logging.getLogger("sparsepo")


@dataclass(kw_only=True)
class Exported:
    out: Path
    """The Hugging Face model directory written."""
    checkpoint: Path
    """The checkpoint directory that was exported."""
    step: int
    """Its optimiser step."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """Newer checkpoints of the run passed over as invalid: (step, reason), newest first."""
    newest_of_run: bool = False
    """True when a run directory was named (the newest valid checkpoint was taken)."""
    source_model: str = ""
    """The model directory the architecture and tokenizer came from."""
    dtype: str = "float32"
    """The weights' dtype as written (`export_dtype`)."""

    def describe(self) -> str:
        """`exported step 20 (bfloat16; newest valid; step 30 was skipped: <reason>)`."""
        text = f"exported step {self.step}" + ("" if self.dtype == "float32" else f" ({self.dtype} weights)")
        if self.skipped:
            text += " (newest valid; " + "; ".join(f"step {s} was skipped: {why}" for s, why in self.skipped) + ")"
        elif self.newest_of_run:
            text += " (the newest checkpoint)"
        return text


def pick_checkpoint(checkpoint: str | Path) -> tuple[Path, list[tuple[int, str]]]:
    """The checkpoint to export (checkpoint.resolve's choice) and the newer ones it passed over, with why."""
    tag_dir = resolve(checkpoint, action="export")
    if Path(checkpoint).resolve() == tag_dir.resolve():
        return tag_dir, []
    skipped = []
    for candidate in reversed(list_tags(tag_dir.parent)):
        if step_of(candidate) <= step_of(tag_dir):
            break
        skipped.append((step_of(candidate), is_valid(candidate)[1]))
    return tag_dir, skipped


def recorded_path(recorded: str, tag_dir: Path, output_dir: str | None, key: str) -> str:
    """A path from the checkpoint's config as it can be opened from here: as recorded when it exists
    (absolute, or relative to this working directory), else relative to the training run's working
    directory (the run directory minus the relative logging.output_dir it was created as)."""
    if Path(recorded).expanduser().exists():
        return os.path.abspath(os.path.expanduser(recorded))
    run_dir = tag_dir.resolve().parent.parent
    parts = Path(os.path.normpath(output_dir)).parts if output_dir and not os.path.isabs(output_dir) else ()
    if parts and ".." not in parts and run_dir.parts[-len(parts):] == parts:
        train_cwd = Path(*run_dir.parts[:-len(parts)])
        candidate = train_cwd / recorded
        if candidate.exists():
            return str(candidate)
        where = f" nor relative to the training run's working directory {train_cwd}"
    else:
        where = ""
    raise CheckpointError(f"cannot export {tag_dir}: {key}={recorded!r} recorded in its {META} is not found here "
                          f"(working directory {Path.cwd()}){where}. Export from the directory the run was "
                          f"started in, or copy the model directory there.")


def export_dtype(train_config: dict, fp32_master: bool):
    """The dtype an export writes: the training precision (bf16 runs: bfloat16, what `final/` holds),
    or float32 — the master weights — on request or for an fp32 run."""
    import torch

    bf16 = train_config.get("precision", "fp32") == "bf16" and not fp32_master
    return torch.bfloat16 if bf16 else torch.float32


def _export_lora(lora: dict, tag_dir: Path, source: str, tokenizer: str, out: Path, adapter_only: bool, dtype) -> None:
    """The adapters of a LoRA checkpoint (fp32 masters) merged into `source` and written in `dtype`, or
    as a PEFT adapter directory."""
    from sparsepo import lora as lora_mod
    from sparsepo.config.lora import LoraConfig
    from sparsepo.engine.policy import fp32_state_dict_from_checkpoint
    from sparsepo.models import load_tokenizer

    state = fp32_state_dict_from_checkpoint(tag_dir.parent, tag_dir.name, exclude_frozen_parameters=True)
    try:
        lora_mod.save_merged(source, LoraConfig(**lora), state, out, tokenizer=load_tokenizer(tokenizer),
                             adapter_subdir=None, merge=not adapter_only, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {tag_dir} does not match {source}: {e}") from e


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, fp32_master: bool = False,
                      adapter_only: bool = False) -> Exported:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsepo.engine.policy import fp32_state_dict_from_checkpoint
    from sparsepo.models import load_tokenizer

    tag_dir, skipped = pick_checkpoint(checkpoint)
    meta = json.loads((tag_dir / META).read_text())
    model_cfg = meta["config"]["model"]
    output_dir = meta["config"].get("logging", {}).get("output_dir")
    source = recorded_path(model_cfg["path"], tag_dir, output_dir, "model.path")
    tokenizer = (recorded_path(model_cfg["tokenizer"], tag_dir, output_dir, "model.tokenizer")
                 if model_cfg.get("tokenizer") else source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot export {tag_dir}: the model it was trained from ({source}) is needed for "
                              f"its architecture and tokenizer and could not be loaded: {e}") from e
    dtype = export_dtype(meta["config"].get("train", {}), fp32_master)
    out = Path(out)
    lora = meta["config"].get("lora") or {}
    if adapter_only and not lora.get("r"):
        raise CheckpointError(f"cannot export {tag_dir} with --adapter-only: it was trained without LoRA "
                              f"(lora.r=0), so it holds no adapters; export the full model without --adapter-only")
    if lora.get("r"):
        _export_lora(lora, tag_dir, source, tokenizer, out, adapter_only, dtype)
    else:
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in fp32_state_dict_from_checkpoint(tag_dir.parent, tag_dir.name).items()}
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "lm_head" not in k or not model.config.tie_word_embeddings]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {tag_dir} does not match {source}: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.save_pretrained(out, safe_serialization=True)
        load_tokenizer(tokenizer).save_pretrained(out)
    result = Exported(out=out, checkpoint=tag_dir, step=meta["step"], skipped=skipped, source_model=source,
                      newest_of_run=Path(checkpoint).resolve() != tag_dir.resolve(), dtype=str(dtype).split(".")[-1])
    atomic_write(out / "sparsepo_export.json", json.dumps(
        {"checkpoint": str(tag_dir.resolve()), "step": meta["step"], "samples": meta["samples"], "dtype": result.dtype,
         "skipped_newer": [{"step": s, "reason": why} for s, why in skipped],
         "method": meta["config"].get("method", {}).get("name"), "source_model": source,
         "lora": ("adapter" if adapter_only else "merged") if lora.get("r") else None}, indent=1))
    write_model_card(out, tag_dir, meta, source)
    log.info("%s from %s to %s", result.describe(), tag_dir, out)
    return result
