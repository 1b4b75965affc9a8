"""The live reference as a DeepSpeed pipeline: stage modules, the last-stage scoring, and the scorer.

A Llama-style causal LM (``model.model.embed_tokens``, ``.layers``, ``.norm``, ``.rotary_emb``,
``model.lm_head``; full causal attention) is cut into L + 2 *pipeline items*:

    EmbeddingStage  (input_ids, attention_mask)        -> (hidden, attention_mask, position_ids)
    DecoderLayerStage x L  (hidden, attention_mask, position_ids) -> (hidden, attention_mask, position_ids)
    HeadStage       (hidden, attention_mask, position_ids) -> logits (N, T, V)

With a feature layer ℓ (FPO's SAE reads decoder layer ℓ's output, ``capture_residual``), decoder
item ℓ appends its output to the tuple, later decoder items pass it through unchanged, and the
head returns ``(logits, hidden_ℓ)``:

    DecoderLayerStage ℓ   (hidden, mask, pos)          -> (hidden, mask, pos, hidden_ℓ)
    DecoderLayerStage >ℓ  (hidden, mask, pos, hidden_ℓ) -> (hidden', mask, pos, hidden_ℓ)
    HeadStage             (hidden, mask, pos, hidden_ℓ) -> (logits, hidden_ℓ)

Only tensors cross stages. Each decoder item rebuilds the 4D causal + padding mask with
transformers' own ``create_causal_mask`` (so it matches the HF forward exactly, whatever the
attention implementation) and its rotary (cos, sin) from ``position_ids``; both are cheap next to
the layer. ``functools.reduce`` over ``pipeline_layers(model)`` reproduces
``model(input_ids, attention_mask).logits`` on one process (``(logits, hidden_ℓ)`` with
``pipeline_layers(model, feature_layer=ℓ)``).

The last stage turns the logits into what the reference serves with ``score_logits`` (the same
functions and alignment as ``sparsepo.models.pair_forward`` / ``score_batch``): sequence and token
log-probs of the response tokens and the top-K next-token log-probs and ids, zero outside the
response mask; and, given a frozen SAE (``features``, e.g. ``sparsepo.fpo.SAEFeatures``, held by
the last stage only), the pooled SAE features of hidden_ℓ over the response tokens and their top-k
(ids, values), computed by ``features.reference`` itself (``FEATURE_FIELDS``).

``build_pipeline`` groups the items into exactly ``num_stages`` contiguous blocks (``stage_parts``
decides where the cuts go), hands DeepSpeed one block per stage (a ``PipelineModule`` with
``partition_method="uniform"`` over num_stages blocks puts block s on stage s), and builds only the
local block: its weights are read tensor by tensor from the checkpoint's safetensors files, so a
rank never holds more than its stage (falls back to loading the full model on CPU and keeping the
slice when the checkpoint is not safetensors or its keys do not follow the module names).

DeepSpeed facts this module relies on (deepspeed 0.19.8):
* ``PipelineModule`` always spans the whole ``torch.distributed`` world, split by
  ``PipeDataParallelTopology(num_pp=S, num_dp=R)``: axes ['pipe', 'data'], global rank
  ``stage * R + replica``. The world size must be a multiple of S.
* ``eval_batch(it, compute_loss=True, reduce_output=None, bcast_loss=False, num_micro_batches=n)``
  returns, on the last stage only, the list of per-micro-batch ``loss_fn`` outputs (None on other
  stages). Only the first and last stage read ``it`` (first: element 0 = inputs, last: element 1 =
  labels); middle stages never touch it. It starts with a world-wide barrier, so every rank of
  every replica must call it the same number of times.
* In eval the engine keeps adding each micro-batch's loss_fn output into ``engine.total_loss``
  (reset only by ``train_batch``): with outputs whose shape changes between batches the second
  ``eval_batch`` dies with a shape mismatch (and so does the second micro-batch of one batch whose
  rows do not split evenly, e.g. 3 + 2 rows). ``PipelineScorer.score`` resets it before and after,
  and ``ScoreFn`` clears it before returning each micro-batch's outputs (``ScoreFn.engine``), so
  only one micro-batch's outputs are ever accumulated, whatever their number and shapes.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from sparsepo.losses.common import token_logps_from_logits
from sparsepo.models import topk_at_response
from sparsepo.reference.outputs import ReferenceOutputs

log = logging.getLogger(__name__)

PARTITIONS = ("uniform", "layers", "parameters")
"""uniform: the L+2 items (embedding, L decoder layers, head) as evenly as possible over the stages,
DeepSpeed's ``partition_uniform`` (earlier stages get the remainder); layers: the L decoder layers
evenly, the embedding riding on the first stage and the head on the last; parameters: contiguous
items balanced by parameter count (minimise the largest stage)."""

SCORE_FIELDS = ("seq_logps", "token_logps", "topk_ids", "topk_logps")
"""What the last stage computes from the logits."""
FEATURE_FIELDS = ("feature_ids", "feature_values")
"""What it computes from decoder layer ℓ's output with an SAE (``build_pipeline(..., features=)``)."""
SERVED_FIELDS = SCORE_FIELDS + FEATURE_FIELDS
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PipelineConfigError(ValueError):
    """A pipeline shape or setting that cannot work (raised before any process group is touched)."""


# ---------------------------------------------------------------------------------------------
# Stage modules (pure torch)
# ---------------------------------------------------------------------------------------------

def _check_full_attention(config) -> None:
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        raise PipelineConfigError(
            f"pipeline reference: layer types {sorted(set(types))} are not supported; the decoder stages "
            f"build a full causal mask (Llama-style models only)")


class EmbeddingStage(nn.Module):
    """(input_ids (N,T) long, attention_mask (N,T)) -> (hidden (N,T,H), attention_mask, position_ids (1,T)).

    position_ids are 0..T-1, as the HF forward uses without a cache (right padding)."""

    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, inputs):
        input_ids, attention_mask = inputs
        hidden = self.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return hidden, attention_mask, position_ids


class DecoderLayerStage(nn.Module):
    """One decoder layer: (hidden, attention_mask (N,T) 2D, position_ids, *carried) -> same shape of tuple.

    Builds the 4D mask with transformers' ``create_causal_mask`` for ``config`` (the attention
    implementation recorded there) and the rotary (cos, sin) with ``rotary_emb``. Tensors after the
    first three (an earlier layer's captured output) pass through unchanged; with ``capture`` this
    layer appends its own output (what ``capture_residual`` hooks: the output of
    ``model.model.layers[ℓ]``)."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, config, capture: bool = False):
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb
        self.config = config  # a PretrainedConfig, not a module: not part of the state dict
        self.capture = capture

    def forward(self, inputs):
        from transformers.masking_utils import create_causal_mask

        hidden, attention_mask, position_ids, *carried = inputs
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        hidden = self.layer(hidden, attention_mask=mask, position_ids=position_ids,
                            position_embeddings=position_embeddings, use_cache=False)
        if isinstance(hidden, (tuple, list)):  # older transformers return (hidden, ...)
            hidden = hidden[0]
        if self.capture:
            if carried:
                raise RuntimeError("pipeline reference: two decoder items capture their output "
                                   "(one feature layer only)")
            carried = [hidden]
        return (hidden, attention_mask, position_ids, *carried)


class HeadStage(nn.Module):
    """Final norm + lm_head: (hidden, attention_mask, position_ids) -> logits (N,T,V) in the model dtype;
    (hidden, attention_mask, position_ids, hidden_ℓ) -> (logits, hidden_ℓ)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, inputs):
        if not isinstance(inputs, (tuple, list)):
            return self.lm_head(self.norm(inputs))
        logits = self.lm_head(self.norm(inputs[0]))
        return (logits, *inputs[3:]) if len(inputs) > 3 else logits


class StageBlock(nn.Module):
    """Consecutive pipeline items run in order: what one pipeline stage holds."""

    def __init__(self, items: Sequence[nn.Module], first_item: int = 0):
        super().__init__()
        self.items = nn.ModuleList(items)
        self.first_item = first_item

    def forward(self, x):
        for item in self.items:
            x = item(x)
        return x


def _check_feature_layer(feature_layer: int | None, num_layers: int) -> None:
    if feature_layer is not None and not 0 <= feature_layer < num_layers:
        raise PipelineConfigError(f"pipeline reference: feature layer {feature_layer} is out of range for a model "
                                  f"with {num_layers} decoder layers (0..{num_layers - 1})")


def pipeline_layers(model, feature_layer: int | None = None) -> list[nn.Module]:
    """The L+2 pipeline items of an HF Llama-style causal LM, in order, sharing the model's modules.

    With ``feature_layer`` ℓ, decoder item ℓ carries its output to the head, which returns
    ``(logits, hidden_ℓ)``."""
    for path in ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise PipelineConfigError(f"pipeline reference: {type(model).__name__} has no `{path}`; "
                                          f"a Llama-style causal LM is required")
    _check_full_attention(model.config)
    base = model.model
    layers = list(base.layers)[: model.config.num_hidden_layers]
    _check_feature_layer(feature_layer, len(layers))
    return [EmbeddingStage(base.embed_tokens),
            *[DecoderLayerStage(layer, base.rotary_emb, model.config, capture=(d == feature_layer))
              for d, layer in enumerate(layers)],
            HeadStage(base.norm, model.lm_head)]


def run_layers(layers: Sequence[nn.Module], input_ids: Tensor, attention_mask: Tensor):
    """Logits (or (logits, hidden_ℓ) with a feature layer) from the items on one process:
    ``functools.reduce`` over ``layers``."""
    return functools.reduce(lambda x, layer: layer(x), layers, (input_ids, attention_mask))


# ---------------------------------------------------------------------------------------------
# Last-stage scoring
# ---------------------------------------------------------------------------------------------

class _Captured:
    """Stands in for ``sparsepo.sae.ResidualCapture``: hands ``features.reference`` the carried hidden_ℓ."""

    def __init__(self, hidden: Tensor):
        self.hidden = hidden

    def take(self) -> Tensor:
        hidden, self.hidden = self.hidden, None
        return hidden


class _Rows:
    """The part of a collated batch ``features.reference`` reads."""

    def __init__(self, response_mask: Tensor):
        self.response_mask = response_mask


def score_fields(topk: int | None, features: bool) -> tuple[str, ...]:
    """The names of ``score_logits``' outputs, in order."""
    return (("seq_logps", "token_logps") + (("topk_logps", "topk_ids") if topk else ())
            + (FEATURE_FIELDS if features else ()))


def score_logits(logits: Tensor, input_ids: Tensor, response_mask: Tensor, topk: int | None, *,
                 features=None, hidden: Tensor | None = None) -> tuple[Tensor, ...]:
    """What the reference serves, from the logits: (seq_logps (N,), token_logps (N,T)) and, when
    topk >= 1, (topk_logps (N,T,K), topk_ids (N,T,K) long) appended; with ``features`` (an
    ``SAEFeatures``-like object) and ``hidden`` (decoder layer ℓ's output (N,T,D)),
    (feature_ids (N,k) long, feature_values (N,k)) appended, from ``features.reference``.

    Same computation as ``pair_forward`` + ``topk_at_response`` (float32 logits, position t from
    logits[t-1], position 0 is 0, everything zero outside the response mask) and ``score_batch``'s
    features (pooled SAE activations over the response tokens, their top-k)."""
    logits = logits.float()
    token_logps = token_logps_from_logits(logits, input_ids) * response_mask
    out: tuple[Tensor, ...] = (token_logps.sum(-1), token_logps)
    if topk:
        values, ids = topk_at_response(logits, response_mask, topk)
        out = out + (values, ids)
    if features is not None:
        if hidden is None:
            raise RuntimeError("score_logits: an SAE was given but no layer output reached the last stage")
        got = features.reference(_Captured(hidden), _Rows(response_mask))
        out = out + tuple(got[name] for name in FEATURE_FIELDS)
    return out


class ScoreFn:
    """The PipelineModule ``loss_fn``: ``(head output, (input_ids, response_mask)) -> score_logits(...)``.

    The head output is the logits, or (logits, hidden_ℓ) when the pipeline carries a feature layer.
    ``feature_layer`` is set on every stage (the decoder item that captures is built from it);
    ``features`` (the SAE) only on the last stage, the only one that calls this. ``engine``, when
    set, has its ``total_loss`` cleared before each micro-batch's outputs are returned (module
    docstring)."""

    __name__ = "score_logits"

    def __init__(self, topk: int | None, *, feature_layer: int | None = None, features=None):
        if features is not None and feature_layer is None:
            feature_layer = features.layer
        if features is not None and features.layer != feature_layer:
            raise PipelineConfigError(f"pipeline reference: the SAE reads layer {features.layer}, the pipeline "
                                      f"carries layer {feature_layer}")
        self.topk = topk
        self.feature_layer = feature_layer
        self.features = features
        self.engine = None

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the returned tensors, in order."""
        return score_fields(self.topk, self.feature_layer is not None)

    def __call__(self, outputs, labels) -> tuple[Tensor, ...]:
        input_ids, response_mask = labels
        hidden = None
        if isinstance(outputs, (tuple, list)):
            outputs, hidden = outputs[0], (outputs[1] if len(outputs) > 1 else None)
        if self.feature_layer is not None and (self.features is None or hidden is None):
            raise RuntimeError(f"pipeline reference: feature layer {self.feature_layer} needs the SAE on the last "
                               f"stage and layer {self.feature_layer}'s output from the pipeline "
                               f"(SAE {'missing' if self.features is None else 'present'}, "
                               f"layer output {'missing' if hidden is None else 'present'})")
        out = score_logits(outputs, input_ids, response_mask, self.topk,
                           features=self.features if self.feature_layer is not None else None, hidden=hidden)
        if self.engine is not None:
            self.engine.total_loss = None  # DeepSpeed adds `out` to it next: keep that to one micro-batch
        return out


# ---------------------------------------------------------------------------------------------
# Partitioning (pure)
# ---------------------------------------------------------------------------------------------

def max_stages(num_layers: int, partition: str = "uniform") -> int:
    """The most pipeline stages a model with `num_layers` decoder layers can be cut into: every stage
    needs at least one item, so L + 2 for uniform / parameters and L for layers."""
    if partition not in PARTITIONS:
        raise PipelineConfigError(f"pipeline partition {partition!r} is not one of {PARTITIONS}")
    return num_layers if partition == "layers" else num_layers + 2


def _uniform_bounds(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's partition_uniform for num_items >= num_parts: chunks of n//p, the first n%p one larger."""
    chunk, residual = divmod(num_items, num_parts)
    bounds = [0]
    for p in range(num_parts):
        bounds.append(bounds[-1] + chunk + (1 if p < residual else 0))
    return bounds


def _balanced_bounds(weights: Sequence[float], num_parts: int) -> list[int]:
    """Contiguous, non-empty parts minimising the largest part's weight (DP; ties: earliest cuts)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[j][i]: smallest max-part weight for items[:i] in j parts; cut[j][i]: where the last part starts
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for j in range(1, num_parts + 1):
        for i in range(j, n - (num_parts - j) + 1):
            for k in range(j - 1, i):
                cost = max(best[j - 1][k], prefix[i] - prefix[k])
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, k
    bounds = [n]
    for j in range(num_parts, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    return bounds[::-1]


def stage_parts(num_layers: int, num_stages: int, partition: str = "uniform",
                item_params: Sequence[int] | None = None) -> list[int]:
    """Item bounds per stage over the L+2 items: stage s holds items [parts[s], parts[s+1]).

    Refuses shapes that leave a stage empty, with the arithmetic."""
    if num_layers < 1:
        raise PipelineConfigError(f"pipeline reference: the model has {num_layers} decoder layers")
    if num_stages < 1:
        raise PipelineConfigError(f"pipeline reference: num_stages={num_stages} must be >= 1")
    limit = max_stages(num_layers, partition)
    if num_stages > limit:
        what = (f"{num_layers} decoder layers (partition='layers' gives every stage at least one decoder layer)"
                if partition == "layers" else
                f"{num_layers} decoder layers + embedding + head = {num_layers + 2} pipeline items")
        raise PipelineConfigError(f"pipeline reference: num_stages={num_stages} > {limit}: the model has {what}, "
                                  f"so at most {limit} stages can each hold something")
    n_items = num_layers + 2
    if partition == "uniform":
        return _uniform_bounds(n_items, num_stages)
    if partition == "layers":
        dec = _uniform_bounds(num_layers, num_stages)  # decoder layer d is item d + 1
        return [0] + [b + 1 for b in dec[1:-1]] + [n_items]
    if item_params is None or len(item_params) != n_items:
        raise PipelineConfigError(f"partition='parameters' needs {n_items} item parameter counts, got "
                                  f"{None if item_params is None else len(item_params)}")
    return _balanced_bounds(item_params, num_stages)


# ---------------------------------------------------------------------------------------------
# Loading one stage's items
# ---------------------------------------------------------------------------------------------

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
        _check_feature_layer(feature_layer, self.num_layers)
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


# ---------------------------------------------------------------------------------------------
# DeepSpeed pipeline
# ---------------------------------------------------------------------------------------------

def _block_spec(loader: StageLoader, lo: int, hi: int, feature_layer: int | None = None):
    """A DeepSpeed LayerSpec whose build() loads items [lo, hi): only called on the owning stage."""
    from deepspeed.pipe import LayerSpec

    class _StageBlockSpec(LayerSpec):
        def __init__(self):
            super().__init__(StageBlock, [])
            self.bounds = (lo, hi)

        def build(self, log=False):
            return loader.build(lo, hi, feature_layer)

        def __repr__(self):
            return f"StageBlock(items [{lo}, {hi}))"

    return _StageBlockSpec()


def ds_inference_config(*, steps_per_print: int = 10**9) -> dict:
    """The minimal DeepSpeed config for an eval-only PipelineEngine: no optimizer, no ZeRO, no fp16/bf16
    (the stage weights are already in the wanted dtype)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "steps_per_print": steps_per_print, "wall_clock_breakdown": False,
            "zero_optimization": {"stage": 0}}


def build_pipeline(model_path: str, *, num_stages: int, topk: int | None, precision: str = "fp32",
                   partition: str = "uniform", ds_config: dict | None = None, feature_layer: int | None = None,
                   features=None):
    """A DeepSpeed PipelineEngine (eval only, no optimizer) over the current torch.distributed world.

    World = num_stages x R data-parallel replicas (global rank = stage * R + replica). Initialises
    torch.distributed with ``deepspeed.init_distributed()`` when it is not yet (env:// variables).
    Each rank builds only its stage's items (see StageLoader). The engine's module (a
    PipelineModule, ``dynamic_shape=True``) has ``loss_fn = ScoreFn(...)``: ``eval_batch`` returns
    per-micro-batch ``score_logits`` tuples on the last stage.

    SAE features: ``feature_layer`` ℓ makes the stage holding decoder layer ℓ carry its output to
    the last stage; ``features`` is the frozen SAE wrapper there (``sparsepo.fpo.SAEFeatures``: an
    object with ``.layer``, ``.k``, ``.reference(cap, batch)``), or a zero-argument callable
    returning one, called on the last stage only (so only the last stage loads the SAE). Given an
    object, ``feature_layer`` defaults to its layer. Every rank must pass the same ``feature_layer``.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule

    if partition not in PARTITIONS:
        raise PipelineConfigError(f"pipeline partition {partition!r} is not one of {PARTITIONS}")
    if topk is not None and topk < 0:
        raise PipelineConfigError(f"pipeline reference: topk={topk} must be >= 0")
    loader = StageLoader(model_path, precision)
    if topk and topk > loader.config.vocab_size:
        raise PipelineConfigError(f"pipeline reference: topk={topk} > vocab size {loader.config.vocab_size}")
    load_features = None
    if features is not None:
        if callable(features) and not hasattr(features, "reference"):
            load_features = features
        else:
            load_features = lambda: features  # noqa: E731
            if feature_layer is None:
                feature_layer = features.layer
        if feature_layer is None:
            raise PipelineConfigError("pipeline reference: a features loader needs feature_layer")
    elif feature_layer is not None:
        raise PipelineConfigError("pipeline reference: feature_layer without features (the SAE for the last stage)")
    _check_feature_layer(feature_layer, loader.num_layers)
    parts = stage_parts(loader.num_layers, num_stages, partition,
                        loader.item_params() if partition == "parameters" else None)
    if not dist.is_initialized():
        deepspeed.init_distributed()
    world = dist.get_world_size()
    if world % num_stages:
        raise PipelineConfigError(f"pipeline reference: world size {world} is not a multiple of "
                                  f"num_stages={num_stages} (world = stages x replicas)")
    specs = [_block_spec(loader, parts[s], parts[s + 1], feature_layer) for s in range(num_stages)]
    score_fn = ScoreFn(topk, feature_layer=feature_layer)
    module = PipelineModule(layers=specs, num_stages=num_stages, loss_fn=score_fn,
                            partition_method="uniform", dynamic_shape=True)
    module.eval()
    module.requires_grad_(False)
    if load_features is not None:
        # Only the last stage loads the SAE; a failure there must fail every rank (the others would
        # otherwise wait in deepspeed.initialize's collectives until the process-group timeout).
        error = None
        if module.stage_id == num_stages - 1:
            try:
                sae_features = load_features()
                if sae_features.layer != feature_layer:
                    raise PipelineConfigError(f"pipeline reference: the SAE reads layer {sae_features.layer}, the "
                                              f"pipeline carries layer {feature_layer}")
                score_fn.features = sae_features
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = f"{type(err).__name__}: {err}"
        errors: list = [None] * world
        dist.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise PipelineConfigError(f"pipeline reference: the last stage (rank {rank}) could not load the SAE: "
                                      f"{message}")
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config or ds_inference_config())
    engine.sparsepo_parts = parts
    score_fn.engine = engine
    return engine


class PipelineScorer:
    """Scores collated batches through a pipeline engine from ``build_pipeline``.

    Every rank of the reference world calls ``score`` once per round (``eval_batch`` starts with a
    world-wide barrier); each replica scores its own batch. The first and the last stage of a
    replica need the batch (``needs_batch``); middle stages may pass None. The last stage returns
    ``ReferenceOutputs``, every other stage None. A batch's 2B rows are cut into ``micro_batches``
    row chunks that flow through the stages one after another (rows are independent, so results do
    not depend on the cut); 2B must be >= micro_batches (the count is fixed because middle stages,
    which never see the batch, must run the same schedule).

    With a feature layer (``build_pipeline(..., features=)``) the outputs also include
    ``FEATURE_FIELDS`` (feature_ids (2B,k), feature_values (2B,k)), computed on the last stage,
    which holds the SAE (``features``; None on the other stages).

    Hazards (they hang rather than fail): every rank of the reference world must call ``score`` the
    same number of times, replicas included (``eval_batch``'s world barrier is matched by *any*
    barrier, so a replica that skips a round pairs with another's next round or exit barrier); and
    a first/last stage that raises before ``eval_batch`` (e.g. the micro-batch check) leaves the
    other ranks waiting in that barrier until the process-group timeout.
    """

    def __init__(self, engine, *, micro_batches: int = 1, outputs: Sequence[str] | None = None):
        score_fn = engine.module.loss_fn
        topk = score_fn.topk  # the K the last stage computes (build_pipeline's topk)
        has_features = score_fn.feature_layer is not None
        if micro_batches < 1:
            raise PipelineConfigError(f"micro_batches={micro_batches} must be >= 1")
        if outputs is None:  # everything this engine computes
            outputs = SCORE_FIELDS + (FEATURE_FIELDS if has_features else ())
        unknown = [o for o in outputs if o not in SERVED_FIELDS]
        if unknown:
            raise PipelineConfigError(f"pipeline reference cannot produce {unknown}; it serves {SERVED_FIELDS}")
        if not has_features and any(o in FEATURE_FIELDS for o in outputs):
            raise PipelineConfigError(f"pipeline reference: {[o for o in outputs if o in FEATURE_FIELDS]} need an "
                                      f"SAE: build the pipeline with features= (and feature_layer=)")
        if not topk and any(o in ("topk_ids", "topk_logps") for o in outputs):
            outputs = tuple(o for o in outputs if o not in ("topk_ids", "topk_logps"))
        self.engine = engine
        self.topk = topk
        self.micro_batches = micro_batches
        self.outputs = tuple(outputs)
        self._topo = engine.module.topology()

    @classmethod
    def from_pretrained(cls, model_path: str, *, num_stages: int, topk: int | None, precision: str = "fp32",
                        partition: str = "uniform", micro_batches: int = 1,
                        outputs: Sequence[str] | None = None, feature_layer: int | None = None,
                        features=None) -> "PipelineScorer":
        """``features``/``feature_layer``: see ``build_pipeline`` (a loader callable keeps the SAE
        off every stage but the last)."""
        engine = build_pipeline(model_path, num_stages=num_stages, topk=topk, precision=precision,
                                partition=partition, feature_layer=feature_layer, features=features)
        return cls(engine, micro_batches=micro_batches, outputs=outputs)

    @property
    def feature_layer(self) -> int | None:
        """The decoder layer whose output the pipeline carries to the SAE (None: no features)."""
        return self.engine.module.loss_fn.feature_layer

    @property
    def features(self):
        """The SAE wrapper (``SAEFeatures``) on the last stage; None on the others or without features."""
        return self.engine.module.loss_fn.features

    # --- who is who (ranks of the reference world) ---
    @property
    def num_stages(self) -> int:
        return self._topo.get_dim("pipe")

    @property
    def num_replicas(self) -> int:
        return self._topo.get_dim("data")

    @property
    def global_rank(self) -> int:
        return self.engine.global_rank

    @property
    def stage_id(self) -> int:
        return self._topo.get_coord(self.global_rank).pipe

    @property
    def replica_index(self) -> int:
        return self._topo.get_coord(self.global_rank).data

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    @property
    def parts(self) -> list[int]:
        """Item bounds per stage: stage s holds items [parts[s], parts[s+1]) of the L+2."""
        return list(self.engine.sparsepo_parts)

    @property
    def needs_batch(self) -> bool:
        return self.is_first_stage or self.is_last_stage

    def rank_of(self, stage: int, replica: int) -> int:
        return self._topo.get_rank(pipe=stage, data=replica)

    def stage_global_ranks(self, stage: int) -> list[int]:
        """Reference-world ranks of `stage`, indexed by replica."""
        return [self.rank_of(stage, r) for r in range(self.num_replicas)]

    def last_stage_global_ranks(self) -> list[int]:
        """Who sends results: the last stage of replica r is element r."""
        return self.stage_global_ranks(self.num_stages - 1)

    def first_stage_global_ranks(self) -> list[int]:
        return self.stage_global_ranks(0)

    # --- scoring ---
    def _micro_batches(self, batch) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """The data eval_batch reads: per micro-batch ((input_ids, attention_mask), (input_ids, response_mask))."""
        n = self.micro_batches
        rows = batch.input_ids.shape[0]
        if rows < n:
            raise PipelineConfigError(f"batch of {rows} rows cannot be cut into micro_batches={n}")
        ids = batch.input_ids.tensor_split(n)
        attn = batch.attention_mask.tensor_split(n)
        resp = batch.response_mask.tensor_split(n)
        return [((i, a), (i, r)) for i, a, r in zip(ids, attn, resp)]

    @torch.no_grad()
    def score(self, batch) -> ReferenceOutputs | None:
        if self.needs_batch and batch is None:
            raise ValueError(f"stage {self.stage_id} (first or last) needs the batch; only middle stages may pass None")
        data = self._micro_batches(batch) if self.needs_batch else []  # middle stages never read it
        engine = self.engine
        engine.total_loss = None  # see module docstring: eval_batch accumulates into it
        engine.total_additional_losses = None
        try:
            per_micro = engine.eval_batch(iter(data), compute_loss=True, reduce_output=None, bcast_loss=False,
                                          num_micro_batches=self.micro_batches)
        finally:
            engine.total_loss = None
            engine.total_additional_losses = None
            engine.fwd_outputs = []
        if not self.is_last_stage:
            return None
        if len(per_micro) != self.micro_batches:
            raise RuntimeError(f"pipeline returned {len(per_micro)} micro-batch outputs, expected {self.micro_batches}")
        names = self.engine.module.loss_fn.fields
        if any(len(mb) != len(names) for mb in per_micro):
            raise RuntimeError(f"pipeline returned {[len(mb) for mb in per_micro]} outputs per micro-batch, "
                               f"expected {len(names)} ({names})")
        produced = {name: torch.cat([mb[j] for mb in per_micro]) for j, name in enumerate(names)}
        ro = ReferenceOutputs(example_ids=list(batch.example_ids))
        for name in self.outputs:
            setattr(ro, name, produced[name])
        return ro
