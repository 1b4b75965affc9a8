"""`sparsepo export CHECKPOINT OUT`: a sharded training checkpoint -> a Hugging Face model directory.

CHECKPOINT is a checkpoint directory (`<run>/checkpoints/step-00000020`), or a run directory /
its checkpoints/ directory (then its newest valid checkpoint). The checkpoint's sparsepo.json names
the model it started from; its architecture and tokenizer are reused, the weights come from
DeepSpeed's zero-to-fp32 consolidation of the shards (fp32 master weights, whatever the training
precision). Runs on one process, no torch.distributed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sparsepo.checkpoint import META, CheckpointError, resolve

log = logging.getLogger("sparsepo")


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsepo.engine.policy import fp32_state_dict_from_checkpoint
    from sparsepo.models import load_tokenizer

    tag_dir = resolve(checkpoint, action="export")
    meta = json.loads((tag_dir / META).read_text())
    model_cfg = meta["config"]["model"]
    source = model_cfg["path"]
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot export {tag_dir}: the model it was trained from ({source}) is needed for "
                              f"its architecture and tokenizer and could not be loaded: {e}") from e
    state = fp32_state_dict_from_checkpoint(tag_dir.parent, tag_dir.name)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {tag_dir} does not match {source}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_cfg["tokenizer"] or source).save_pretrained(out)
    (out / "sparsepo_export.json").write_text(json.dumps(
        {"checkpoint": str(tag_dir.resolve()), "step": meta["step"], "samples": meta["samples"],
         "method": meta["config"].get("method", {}).get("name"), "source_model": source}, indent=1))
    log.info("exported %s (step %d) to %s", tag_dir, meta["step"], out)
    return out
