"""Builds one pipeline stage's items from a checkpoint directory, reading only that stage's tensors
from its safetensors files (a rank never holds more than its stage).

The model is instantiated on the meta device (no memory), so parameter counts per item are free.
``build(lo, hi)`` copies items [lo, hi)'s modules off the meta model, materialises them on CPU and
fills them from ``model.safetensors`` or ``model.safetensors.index.json``. Non-persistent buffers
(Gemma's embedding scale) are not in a checkpoint: they are re-created by the model's own
``_init_weights``, and checked. Where a stage cannot be built that way (no safetensors, keys that
do not follow the module names, a buffer ``_init_weights`` does not re-create) the loader falls back
to ``from_pretrained`` of the full model on CPU and keeps the slice (fine at small scale), logging
the real cause (``fallback_cause``).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from sparsepo.logprobs.families import check_live_supported, family_of
from sparsepo.reference.partition import PipelineConfigError
from sparsepo.reference.stages import StageBlock, check_feature_layer, get_module, item_paths, make_items, pipeline_layers

log = logging.getLogger(__name__)


def _natural(key: str) -> list:
    """Sort key that orders the numbers inside a name by value (experts.2 before experts.10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StageLoader:
    """Pipeline items of a checkpoint directory, each stage reading only its own tensors.

    ``tensors_read`` lists the checkpoint keys read so far (a test checks a stage reads only its
    own); ``fallback_cause`` is None unless a build had to load the full model."""

    def __init__(self, model_path: str, precision: str = "fp32", quantization=None):
        from transformers import AutoConfig, AutoModelForCausalLM

        if precision not in PRECISIONS:
            raise PipelineConfigError(f"pipeline reference: precision={precision!r} is not one of {sorted(PRECISIONS)}")
        self.model_path = str(model_path)
        self.precision = precision
        self.quantization = quantization  # QLoRA's 4-bit reference: transformers' loading quantises it
        self.dtype = PRECISIONS[precision]
        config = AutoConfig.from_pretrained(self.model_path)
        check_live_supported(config)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config)
        self.config = self.skeleton.config  # carries the resolved attention implementation
        self.family = family_of(self.config)
        pipeline_layers(self.skeleton)  # structure checks
        self.num_layers = self.config.num_hidden_layers
        self.weight_map = self._weight_map()
        self.merged: dict[str, tuple] = {}  # model key -> (converter, {source pattern: checkpoint keys}): MoE experts
        self.key_map = self._key_map() if self.weight_map is not None else {}
        self.tensors_read: list[str] = []
        self.fallback_cause: str | None = None
        self._full = None

    @property
    def num_items(self) -> int:
        return self.num_layers + 2

    def item_paths(self, index: int) -> list[str]:
        return item_paths(self.family, index, self.num_layers)

    def item_params(self) -> list[int]:
        """Parameter count of each of the L+2 items (from the meta model: nothing is loaded)."""
        return [sum(p.numel() for path in self.item_paths(i) for p in get_module(self.skeleton, path).parameters())
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

    def _key_map(self) -> dict[str, str]:
        """Model state-dict key -> checkpoint key, through the model's own loading renames
        (``transformers.conversion_mapping``: e.g. GPT-NeoX stores ``lm_head`` as ``embed_out``; a
        checkpoint saved from the base model lacks the ``model.`` prefix). Keys that a tensor-merging
        converter combines (an MoE layer's per-expert weights into one fused tensor) go to
        ``self.merged`` instead, grouped by the model key they make (``_merge`` applies the converter)."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # a transformers without conversion mappings: names are module names
            return {k: k for k in self.weight_map}
        transforms = get_model_conversion_mapping(self.skeleton)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta_state = self.skeleton.state_dict()
        out = {}
        for ckpt_key in sorted(self.weight_map, key=_natural):  # experts in index order (2 before 10)
            model_key, converted = rename_source_key(ckpt_key, renamings, converters,
                                                     self.skeleton.base_model_prefix, meta_state)
            if converted is None:
                out[model_key] = ckpt_key
                continue
            converter = next(c for c in converters if converted in c.source_patterns)
            self.merged.setdefault(model_key, (converter, {}))[1].setdefault(converted, []).append(ckpt_key)
        return out

    def checkpoint_keys(self, path: str, key: str) -> list[str]:
        """The checkpoint tensors the model's `path`.`key` is made of (one, or an MoE layer's per-expert ones)."""
        if f"{path}.{key}" in self.merged:
            return [k for keys in self.merged[f"{path}.{key}"][1].values() for k in keys]
        ckpt_key = self._checkpoint_key(path, key)
        return [] if ckpt_key is None else [ckpt_key]

    def _merge(self, model_key: str, read) -> torch.Tensor:
        """The model's tensor `model_key` from its checkpoint tensors, by the model's own converter
        operations (transformers.core_model_loading: e.g. MergeModulelist then Concatenate)."""
        converter, sources = self.merged[model_key]
        tensors = {pattern: [read(k) for k in keys] for pattern, keys in sources.items()}
        for op in converter.operations:
            tensors = op.convert(tensors, source_patterns=converter.source_patterns,
                                 target_patterns=converter.target_patterns, full_layer_name=model_key,
                                 model=self.skeleton, config=self.config, missing_keys=None)
        (out,) = [v for k, v in tensors.items() if model_key.endswith(k)] or tensors.values()
        return out

    def _full_model(self, cause: str):
        if self._full is None:
            from sparsepo.models import load_frozen_model

            log.warning("pipeline reference: loading the full model from %s on CPU to keep one stage, because %s",
                        self.model_path, cause)
            self.fallback_cause = cause
            self._full = load_frozen_model(self.model_path, precision=self.precision, quantization=self.quantization)
        return self._full

    def _checkpoint_key(self, path: str, key: str) -> str | None:
        model_key = f"{path}.{key}"
        if model_key not in self.key_map and path == self.family.head and self.config.tie_word_embeddings:
            model_key = f"{self.family.embed}.{key}"  # tied head: the checkpoint stores the embedding only
        return self.key_map.get(model_key)

    def _recreate_buffers(self, module: nn.Module, path: str) -> str | None:
        """Fill `module`'s non-persistent buffers with the model's own ``_init_weights``; the cause
        when one is left unset (NaN-filled first, so a buffer it skips is caught)."""
        owners = [(name, sub) for name, sub in module.named_modules() if sub._non_persistent_buffers_set]
        if not owners:
            return None
        with torch.no_grad():
            for _, sub in owners:
                for name in sub._non_persistent_buffers_set:
                    buf = getattr(sub, name)
                    if buf is not None and not buf.is_floating_point():
                        return f"non-persistent buffer {path}.{name} is not floating point (cannot check it)"
                    if buf is not None:
                        buf.fill_(float("nan"))
                self.skeleton._init_weights(sub)
        for prefix, sub in owners:
            for name in sub._non_persistent_buffers_set:
                buf = getattr(sub, name)
                if buf is not None and torch.isnan(buf).any():
                    where = ".".join(p for p in (path, prefix, name) if p)
                    return (f"non-persistent buffer {where} ({type(sub).__name__}) is not in the checkpoint and "
                            f"{type(self.skeleton).__name__}._init_weights does not re-create it")
        return None

    def _load_module(self, path: str) -> tuple[nn.Module | None, str | None]:
        """(the module at `path` on CPU with its checkpoint weights, None), or (None, why not)."""
        from safetensors import safe_open

        module = copy.deepcopy(get_module(self.skeleton, path))  # the skeleton stays on meta
        wanted = {}
        for key in module.state_dict().keys():
            ckpt_key = self._checkpoint_key(path, key)
            if ckpt_key is None and f"{path}.{key}" not in self.merged:
                return None, (f"the checkpoint has no tensor for {path}.{key} (its keys do not follow the module "
                              f"names, even through the model's own loading renames)")
            wanted[key] = ckpt_key
        module.to_empty(device="cpu")
        cause = self._recreate_buffers(module, path)
        if cause is not None:
            return None, cause

        def read(ckpt_key: str) -> torch.Tensor:
            with safe_open(self.weight_map[ckpt_key], "pt") as f:
                self.tensors_read.append(ckpt_key)
                return f.get_tensor(ckpt_key)

        tensors = {key: read(ckpt_key) if ckpt_key is not None else self._merge(f"{path}.{key}", read)
                   for key, ckpt_key in wanted.items()}
        module.load_state_dict(tensors, strict=True, assign=True)
        return module.to(self.dtype), None

    def _load_items(self, lo: int, hi: int) -> tuple[dict[str, nn.Module] | None, str | None]:
        if self.quantization is not None:
            return None, "the reference is 4-bit (lora.load_in_4bit): transformers' loading quantises it"
        if self.weight_map is None:
            return None, f"{self.model_path} has no model.safetensors or model.safetensors.index.json"
        modules: dict[str, nn.Module] = {}
        for i in range(lo, hi):
            for path in self.item_paths(i):
                module, cause = self._load_module(path)
                if module is None:
                    return None, cause
                modules[path] = module
        return modules, None

    def _rotary(self) -> nn.Module | None:
        if self.family.rotary is None:
            return None
        rotary = get_module(self.skeleton, self.family.rotary)
        return type(rotary)(config=self.config)  # built on CPU: its buffers are computed, not loaded

    def build(self, lo: int, hi: int, feature_layer: int | None = None, chunk: int = 0) -> StageBlock:
        """Items [lo, hi) as one StageBlock, in eval mode with gradients off; decoder layer
        ``feature_layer`` (if it is among them) carries its output on (see ``DecoderLayerStage``);
        ``chunk`` > 0: the head hands the lean path its input (``HeadStage``)."""
        check_feature_layer(feature_layer, self.num_layers)
        source, cause = self._load_items(lo, hi)
        if source is None:
            full = self._full_model(cause)
            source = {path: get_module(full, path) for i in range(lo, hi) for path in self.item_paths(i)}
            rotary = get_module(full, self.family.rotary) if self.family.rotary else None
            config = full.config
        else:
            rotary, config = self._rotary(), self.config
        block = StageBlock(make_items(source, config, lo, hi, rotary, feature_layer, chunk), first_item=lo)
        block.eval()
        block.requires_grad_(False)
        block.named_reference = _named(source)  # TR-DPO: what the stage receives, by the model's own names
        return block

    def named_tensors(self):
        """(model name, tensor) of every parameter, one pipeline item at a time (a tied head's weight
        under its own name too): the reference's starting weights without building the whole model
        where the checkpoint allows it."""
        for i in range(self.num_items):
            source, cause = self._load_items(i, i + 1)
            if source is None:
                full = self._full_model(cause)
                source = {path: get_module(full, path) for path in self.item_paths(i)}
            yield from _named(source).items()


def _named(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """{"<module path>.<parameter>": parameter} over `modules` (by path), tied ones under every name."""
    return {f"{path}.{name}": p for path, module in modules.items()
            for name, p in module.named_parameters(remove_duplicate=False)}
