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

Only tensors cross stages. Each decoder item rebuilds its 4D mask with transformers' own mask
builders (so it matches the HF forward exactly, whatever the attention implementation) and its
rotary (cos, sin) from ``position_ids``; both are cheap next to the layer. ``run_layers`` over
``pipeline_layers(model)`` reproduces ``model(input_ids, attention_mask).logits`` on one process
(``(logits, hidden_ℓ)`` with ``pipeline_layers(model, feature_layer=ℓ)``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor, nn

from sparsepo.reference.partition import PipelineConfigError


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


def check_feature_layer(feature_layer: int | None, num_layers: int) -> None:
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
    check_feature_layer(feature_layer, len(layers))
    return [EmbeddingStage(base.embed_tokens),
            *[DecoderLayerStage(layer, base.rotary_emb, model.config, capture=(d == feature_layer))
              for d, layer in enumerate(layers)],
            HeadStage(base.norm, model.lm_head)]


def run_layers(layers: Sequence[nn.Module], input_ids: Tensor, attention_mask: Tensor):
    """Logits (or (logits, hidden_ℓ) with a feature layer) from the items on one process:
    ``functools.reduce`` over ``layers``."""
    return functools.reduce(lambda x, layer: layer(x), layers, (input_ids, attention_mask))
