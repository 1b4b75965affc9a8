"""The pipeline's stage modules (pure torch): a causal LM cut into L + 2 *pipeline items*

    EmbeddingStage  (input_ids, attention_mask)        -> (hidden, attention_mask, position_ids)
    DecoderLayerStage x L  (hidden, attention_mask, position_ids) -> (hidden, attention_mask, position_ids)
    HeadStage       (hidden, attention_mask, position_ids) -> logits (N, T, V)

With a feature layer ℓ (FPO's SAE reads decoder layer ℓ's output, ``capture_residual``), decoder
item ℓ appends its output to the tuple, later decoder items pass it through unchanged, and the
head returns ``(logits, hidden_ℓ)``:

    DecoderLayerStage ℓ   (hidden, mask, pos)          -> (hidden, mask, pos, hidden_ℓ)
    DecoderLayerStage >ℓ  (hidden, mask, pos, hidden_ℓ) -> (hidden', mask, pos, hidden_ℓ)
    HeadStage             (hidden, mask, pos, hidden_ℓ) -> (logits, hidden_ℓ)

Only tensors cross stages. The items reuse the model's own modules (embedding, decoder layers,
final norm, head, rotary) found through the family table (``sparsepo.logprobs.families``); each
decoder item rebuilds its own layer's 4D mask (full or sliding-window causal, as the model's
forward picks it) with transformers' own mask builders, so it matches the HF forward exactly
whatever the attention implementation, and its rotary (cos, sin) from ``position_ids``; both are
cheap next to the layer. The embedding adds learned positions where the family has them (GPT-2);
the head soft-caps the logits where the family does (Gemma 2/3). ``run_layers`` over
``pipeline_layers(model)`` reproduces ``model(input_ids, attention_mask).logits`` on one process
(``(logits, hidden_ℓ)`` with ``pipeline_layers(model, feature_layer=ℓ)``).
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsepo.logprobs.head import Head
from sparsepo.logprobs.lean import HeadInput
from sparsepo.logprobs.families import (SLIDING, Family, check_live_supported, family_of, get_module,  # noqa: F401
                                        layer_attention)
from sparsepo.reference.partition import PipelineConfigError


class EmbeddingStage(nn.Module):
    """(input_ids (N,T) long, attention_mask (N,T)) -> (hidden (N,T,H), attention_mask, position_ids (1,T)).

    position_ids are 0..T-1, as the HF forward uses without a cache; ``embed_positions`` (learned
    absolute positions, GPT-2) is added to the token embedding when given."""

    def __init__(self, embed_tokens: nn.Module, embed_positions: nn.Module | None = None,
                 multiplier: float | None = None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = embed_positions
        self.multiplier = multiplier  # Granite's embedding_multiplier

    def forward(self, inputs):
        input_ids, attention_mask = inputs
        hidden = self.embed_tokens(input_ids)
        if self.multiplier is not None:
            hidden = hidden * self.multiplier
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(position_ids)
        return hidden, attention_mask, position_ids


class DecoderLayerStage(nn.Module):
    """Decoder layer ``index``: (hidden, attention_mask (N,T) 2D, position_ids, *carried) -> same shape of tuple.

    Builds the layer's 4D mask with transformers' ``create_causal_mask`` or
    ``create_sliding_window_causal_mask`` for ``config`` (``families.layer_attention`` picks which,
    as the model's forward does; the attention implementation and window are read from ``config``)
    and the rotary (cos, sin) with ``rotary_emb`` (None: the family has no rotary). Tensors after
    the first three (an earlier layer's captured output) pass through unchanged; with ``capture``
    this layer appends its own output (what ``capture_residual`` hooks: the decoder layer's output)."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module | None, config, index: int, capture: bool = False):
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb
        self.config = config  # a PretrainedConfig, not a module: not part of the state dict
        self.index = index
        self.attention = layer_attention(config, index)
        self.rotary_by_layer_type = family_of(config).rotary_by_layer_type
        self.capture = capture

    def forward(self, inputs):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        hidden, attention_mask, position_ids, *carried = inputs
        build_mask = create_sliding_window_causal_mask if self.attention == SLIDING else create_causal_mask
        mask = build_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                          cache=None, position_ids=position_ids)
        extra = {}
        if self.rotary_emb is not None:
            extra["position_embeddings"] = (self.rotary_emb(hidden, position_ids, self.attention)
                                            if self.rotary_by_layer_type else self.rotary_emb(hidden, position_ids))
        hidden = self.layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra)
        if isinstance(hidden, (tuple, list)):  # older transformers return (hidden, ...)
            hidden = hidden[0]
        if self.capture:
            if carried:
                raise RuntimeError("pipeline reference: two decoder items capture their output "
                                   "(one feature layer only)")
            carried = [hidden]
        return (hidden, attention_mask, position_ids, *carried)


class HeadStage(nn.Module):
    """Final norm + lm_head (+ soft-capping): (hidden, attention_mask, position_ids) -> logits (N,T,V)
    in the model dtype; (hidden, attention_mask, position_ids, hidden_ℓ) -> (logits, hidden_ℓ).

    ``softcap`` c: logits = tanh(logits / c) * c, in the order the Gemma 2/3 forward does it.
    ``chunk`` > 0 (model.logits_chunk; the head an ``nn.Linear``): a ``logprobs.lean.HeadInput`` in place
    of the logits — the normed hidden state and the head, which ``scoring.score`` (the last stage's
    ``ScoreFn``) runs ``chunk`` response positions at a time, so the last stage never holds (N,T,V).
    Which of the two is the stage's ``head`` (``logprobs.head.StageHead``), chosen once by ``Head.for_layers``."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, softcap: float | None = None, chunk: int = 0,
                 scale: float | None = None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        # the path, chosen once (logprobs.head); Cohere's logit_scale, 1 / Granite's logits_scaling: plain only
        self.head = Head.for_layers(lm_head, softcap, chunk, scale=scale)

    def _logits(self, hidden: Tensor) -> Tensor | HeadInput:
        return self.head(self.norm(hidden))

    def forward(self, inputs):
        if not isinstance(inputs, (tuple, list)):
            return self._logits(inputs)
        logits = self._logits(inputs[0])
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


def check_feature_layer(feature_layer: int | None, num_layers: int) -> None:
    if feature_layer is not None and not 0 <= feature_layer < num_layers:
        raise PipelineConfigError(f"pipeline reference: feature layer {feature_layer} is out of range for a model "
                                  f"with {num_layers} decoder layers (0..{num_layers - 1})")


def item_paths(family: Family, index: int, num_layers: int) -> list[str]:
    """The model's modules (dotted paths) that pipeline item `index` of the L+2 is built from."""
    if index == 0:
        return [family.embed] + ([family.positions] if family.positions else [])
    if index <= num_layers:
        return [f"{family.layers}.{index - 1}"]
    return [family.norm, family.head]


def make_items(modules: Mapping[str, nn.Module], config, lo: int, hi: int, rotary_emb: nn.Module | None,
               feature_layer: int | None = None, chunk: int = 0) -> list[nn.Module]:
    """Pipeline items [lo, hi) from the model's modules by path (``item_paths``), in order; ``chunk``:
    the head's (``HeadStage``)."""
    family, num_layers = family_of(config), config.num_hidden_layers
    softcap = getattr(config, "final_logit_softcapping", None) if family.logit_softcap else None
    items: list[nn.Module] = []
    for i in range(lo, hi):
        if i == 0:
            items.append(EmbeddingStage(modules[family.embed], modules[family.positions] if family.positions else None,
                                        getattr(config, family.embed_multiplier) if family.embed_multiplier else None))
        elif i <= num_layers:
            items.append(DecoderLayerStage(modules[f"{family.layers}.{i - 1}"], rotary_emb, config, i - 1,
                                           capture=(i - 1 == feature_layer)))
        else:
            items.append(HeadStage(modules[family.norm], modules[family.head], softcap, chunk, family.logit_scale(config)))
    return items


def pipeline_layers(model, feature_layer: int | None = None, chunk: int = 0) -> list[nn.Module]:
    """The L+2 pipeline items of an HF causal LM of a supported family, in order, sharing the model's modules.

    With ``feature_layer`` ℓ, decoder item ℓ carries its output to the head, which returns
    ``(logits, hidden_ℓ)``."""
    config = model.config
    check_live_supported(config)
    family, num_layers = family_of(config), config.num_hidden_layers
    check_feature_layer(feature_layer, num_layers)
    paths = [p for i in range(num_layers + 2) for p in item_paths(family, i, num_layers)]
    modules = {}
    for path in paths + ([family.rotary] if family.rotary else []):
        try:
            modules[path] = get_module(model, path)
        except (AttributeError, IndexError):
            raise PipelineConfigError(f"pipeline reference: {type(model).__name__} has no `{path}`, where the "
                                      f"{family.name} entry of sparsepo.logprobs.families expects it") from None
    return make_items(modules, config, 0, num_layers + 2, modules.get(family.rotary), feature_layer, chunk)


def run_layers(layers: Sequence[nn.Module], input_ids: Tensor, attention_mask: Tensor):
    """Logits (or (logits, hidden_ℓ) with a feature layer) from the items on one process:
    ``functools.reduce`` over ``layers``."""
    return functools.reduce(lambda x, layer: layer(x), layers, (input_ids, attention_mask))
