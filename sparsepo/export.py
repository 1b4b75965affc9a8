"""`sparsepo export CHECKPOINT OUT`: a sharded training checkpoint -> a Hugging Face model directory.

The checkpoint's sparsepo.json names the model it started from; its architecture and tokenizer
are reused, the weights come from DeepSpeed's zero-to-fp32 consolidation of the shards.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsepo.checkpoint import META, CheckpointError, is_valid


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsepo import engine
    from sparsepo.models import load_tokenizer

    tag_dir = Path(checkpoint)
    ok, why = is_valid(tag_dir)
    if not ok:
        raise CheckpointError(f"cannot export {tag_dir}: {why}")
    meta = json.loads((tag_dir / META).read_text())
    model_cfg = meta["config"]["model"]
    state = engine.fp32_state_dict_from_checkpoint(tag_dir.parent, tag_dir.name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_cfg["path"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {tag_dir} does not match {model_cfg['path']}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_cfg["tokenizer"] or model_cfg["path"]).save_pretrained(out)
    return out
