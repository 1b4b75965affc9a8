"""Builds one pipeline stage's items from a checkpoint directory, reading only that stage's tensors
from its safetensors files (a rank never holds more than its stage)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from sparsepo.reference.partition import PipelineConfigError
from sparsepo.reference.stages import (DecoderLayerStage, EmbeddingStage, HeadStage, StageBlock,
                                       check_feature_layer, pipeline_layers)

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _item_prefixes(index: int, num_layers: int) -> list[tuple[str, str]]:
    """(attribute path in the HF model, checkpoint key prefix) pairs for pipeline item `index`."""
    if index == 0:
        return [("model.embed_tokens", "model.embed_tokens.")]
    if index <= num_layers:
        return [(f"model.layers.{index - 1}", f"model.layers.{index - 1}.")]
    return [("model.norm", "model.norm."), ("lm_head", "lm_head.")]


def _get(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class StageLoader:
    """Builds pipeline items of a checkpoint directory, reading only their weights.

    The model is instantiated on the meta device (no memory), so parameter counts per item are free;
    `build(lo, hi)` materialises items [lo, hi) on CPU and fills them from the safetensors files
    (``model.safetensors`` or ``model.safetensors.index.json``). Checkpoints without safetensors, or
    whose keys do not follow the module names, fall back to ``from_pretrained`` of the full model on
    CPU, keeping the slice (fine at small scale; logged)."""

    def __init__(self, model_path: str, precision: str = "fp32"):
        from transformers import AutoConfig, AutoModelForCausalLM

        if precision not in PRECISIONS:
            raise PipelineConfigError(f"pipeline reference: precision={precision!r} is not one of {sorted(PRECISIONS)}")
        self.model_path = str(model_path)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        config = AutoConfig.from_pretrained(self.model_path)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config)
        self.config = self.skeleton.config  # carries the resolved attention implementation
        pipeline_layers(self.skeleton)  # structure checks
        self.num_layers = self.config.num_hidden_layers
        self.weight_map = self._weight_map()
        self._full = None

    @property
    def num_items(self) -> int:
        return self.num_layers + 2

    def item_params(self) -> list[int]:
        """Parameter count of each of the L+2 items (from the meta model: nothing is loaded)."""
        return [sum(p.numel() for path, _ in _item_prefixes(i, self.num_layers)
                    for p in _get(self.skeleton, path).parameters())
                for i in range(self.num_items)]

    def _weight_map(self) -> dict[str, str] | None:
        root = Path(self.model_path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            return {k: str(root / v) for k, v in json.loads(index.read_text())["weight_map"].items()}
        single = root / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                return {k: str(single) for k in f.keys()}
        return None

    def _full_model(self):
        if self._full is None:
            from sparsepo.models import load_frozen_model

            log.warning("pipeline reference: loading the full model from %s on CPU to keep one stage "
                        "(no usable safetensors weight map)", self.model_path)
            self._full = load_frozen_model(self.model_path, precision=self.precision)
        return self._full

    def _load_module(self, path: str, prefix: str) -> nn.Module | None:
        """The module at `path` on CPU with its checkpoint weights, or None when keys are missing."""
        from safetensors import safe_open

        module = _get(self.skeleton, path)
        state_keys = list(module.state_dict().keys())
        persistent = set(state_keys)
        if any(name not in persistent for name, _ in module.named_buffers()):
            return None  # non-persistent buffers would come out uninitialised
        wanted = {}
        for key in state_keys:
            ckpt_key = prefix + key
            if ckpt_key not in self.weight_map and path == "lm_head" and self.config.tie_word_embeddings:
                ckpt_key = "model.embed_tokens." + key  # tied head: the checkpoint stores the embedding only
            if ckpt_key not in self.weight_map:
                return None
            wanted[key] = ckpt_key
        module.to_empty(device="cpu")
        by_file: dict[str, list[str]] = {}
        for key, ckpt_key in wanted.items():
            by_file.setdefault(self.weight_map[ckpt_key], []).append(key)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:
                for key in keys:
                    tensors[key] = f.get_tensor(wanted[key])
        module.load_state_dict(tensors, strict=True, assign=True)
        return module.to(self.dtype)

    def _load_items(self, lo: int, hi: int) -> dict[str, nn.Module] | None:
        modules: dict[str, nn.Module] = {}
        for i in range(lo, hi):
            for path, prefix in _item_prefixes(i, self.num_layers):
                mod = self._load_module(path, prefix)
                if mod is None:
                    log.warning("pipeline reference: %s has no usable checkpoint keys under %r; falling "
                                "back to a full load", self.model_path, prefix)
                    return None
                modules[path] = mod
        return modules

    def _rotary(self) -> nn.Module:
        rotary = self.skeleton.model.rotary_emb
        return type(rotary)(config=self.config)  # built on CPU: its buffers are computed, not loaded

    def build(self, lo: int, hi: int, feature_layer: int | None = None) -> StageBlock:
        """Items [lo, hi) as one StageBlock, in eval mode with gradients off; decoder layer
        ``feature_layer`` (if it is among them) carries its output on (see ``DecoderLayerStage``)."""
        check_feature_layer(feature_layer, self.num_layers)
        source = self._load_items(lo, hi) if self.weight_map is not None else None
        if source is None:
            full = self._full_model()
            source = {path: _get(full, path) for i in range(lo, hi) for path, _ in _item_prefixes(i, self.num_layers)}
            rotary, config = full.model.rotary_emb, full.config
        else:
            rotary, config = self._rotary(), self.config
        items: list[nn.Module] = []
        for i in range(lo, hi):
            if i == 0:
                items.append(EmbeddingStage(source["model.embed_tokens"]))
            elif i <= self.num_layers:
                items.append(DecoderLayerStage(source[f"model.layers.{i - 1}"], rotary, config,
                                               capture=(i - 1 == feature_layer)))
            else:
                items.append(HeadStage(source["model.norm"], source["lm_head"]))
        block = StageBlock(items, first_item=lo)
        block.eval()
        block.requires_grad_(False)
        return block
