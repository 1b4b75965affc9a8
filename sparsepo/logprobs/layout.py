"""A family the table does not list, read from the model itself: the usual decoder-only layout.

Most ``*ForCausalLM`` classes in transformers share one shape: a base model holding a token
embedding, one ``nn.ModuleList`` of decoder layers, a final norm and a model-level rotary module,
and a head. Their base forward embeds, builds its masks with transformers' mask builders, computes
(cos, sin) once, calls each layer with them, and norms; the ``*ForCausalLM`` forward applies the
head. `infer_family` finds those pieces by rule on a skeleton built on the meta device (no
weights, no memory) and reads from the two forwards' source which masks each layer gets:

  layer_types     the base forward indexes ``config.layer_types`` (or ``decoder_layer.attention_type``)
  sliding_window  it builds ``create_sliding_window_causal_mask`` for every layer (Mistral's way)
  causal          it builds ``create_causal_mask`` only

A model is refused — with the rule it breaks — when its forwards do more than the stages
reproduce: anything else applied to the embeddings or the logits (scales, soft-caps, ALiBi),
learned positions, base-model modules with weights that are none of the five pieces, or not
exactly one list of ``num_hidden_layers`` layers. Those families need a table entry
(``sparsepo.logprobs.families.FAMILIES``) whose knobs say what to do, or stay in cache mode.
"""

from __future__ import annotations

import inspect
import json
import re
from functools import lru_cache

NORM = re.compile(r"norm|ln_?f", re.IGNORECASE)
_EXTRA_EMBED = re.compile(r"inputs_embeds\s*=\s*inputs_embeds\s*[*/]|inputs_embeds\s*\*=|hidden_states\s*=\s*"
                          r"hidden_states\s*[*/]|\balibi\b|embed_positions|position_embeddings\s*=\s*self\.wpe|"
                          r"normalizer|embed_scale")
_EXTRA_LOGITS = re.compile(r"^\s*logits\s*(=(?!\s*self\.lm_head\()(?!\s*logits\s*,)|[*/+-]=).*$|softcap",
                           re.MULTILINE)
"""A statement that gives the logits anything but the head's output (a `logits=logits,` argument
passes them on), or a soft-cap."""


class LayoutError(ValueError):
    """Why a model's forward does not fit the usual layout (the reason of a refusal)."""


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _path_of(model, module) -> str:
    for name, sub in model.named_modules():
        if sub is module:
            return name
    raise LayoutError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _skeleton(config):
    """The model class's module tree on the meta device: its structure, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def mask_rule(base_forward_source: str) -> str:
    """causal | sliding_window | layer_types: which masks the base forward gives its layers."""
    if "layer_types[" in base_forward_source or ".attention_type]" in base_forward_source:
        return "layer_types"
    if "create_sliding_window_causal_mask" in base_forward_source:
        return "sliding_window"
    if "create_causal_mask" in base_forward_source:
        return "causal"
    raise LayoutError("its base forward builds no mask with transformers' create_causal_mask")


def _pieces(model, config) -> dict[str, str | None]:
    """Dotted paths of embed, layers, norm, head, rotary in `model` (LayoutError when ambiguous)."""
    from torch import nn

    base = model.base_model
    prefix = _path_of(model, base)
    at = (lambda name: f"{prefix}.{name}" if prefix else name)  # noqa: E731
    lists = [n for n, m in base.named_children() if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers]
    if len(lists) != 1:
        raise LayoutError(f"its base model holds {len(lists)} lists of num_hidden_layers={config.num_hidden_layers} "
                          f"modules, not one list of decoder layers")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        raise LayoutError("it has no output embedding (head)")
    rotary = [n for n, m in base.named_children() if "rotary" in type(m).__name__.lower()]
    norms = [n for n, m in base.named_children() if NORM.search(n)]  # OLMo's has no weights
    if len(norms) != 1:
        raise LayoutError(f"its base model has {len(norms)} final norms ({norms}), not one")
    known = {_path_of(base, embed) if embed in base.modules() else None, lists[0], norms[0], *rotary}
    extra = [n for n, m in base.named_children() if n not in known and any(True for _ in m.parameters())]
    if extra:
        raise LayoutError(f"its base model holds modules with weights that are none of embedding, layers, final "
                          f"norm and rotary: {extra}")
    if len(rotary) > 1:
        raise LayoutError(f"its base model holds {len(rotary)} rotary modules ({rotary})")
    return {"embed": _path_of(model, embed), "layers": at(lists[0]), "norm": at(norms[0]),
            "head": _path_of(model, head), "rotary": at(rotary[0]) if rotary else None}


@lru_cache(maxsize=16)
def _infer(config_class, config_json: str) -> tuple[dict, str]:
    config = config_class.from_dict(json.loads(config_json))
    model = _skeleton(config)
    base_src, lm_src = _source(type(model.base_model).forward), _source(type(model).forward)
    found = _EXTRA_EMBED.search(base_src)
    if found:
        raise LayoutError(f"its base forward does more to the embeddings or positions than the stages do "
                          f"(`{found.group(0)}`)")
    found = _EXTRA_LOGITS.search(lm_src)
    if found:
        raise LayoutError(f"its forward changes the logits after the head (`{found.group(0).split('#')[0].strip()}`)")
    pieces = _pieces(model, config)
    if pieces["rotary"] is None:
        raise LayoutError("it has no model-level rotary module (its positions come from elsewhere)")
    return pieces, mask_rule(base_src)


def infer_layout(config) -> tuple[dict, str]:
    """({embed, layers, norm, head, rotary}: dotted paths, mask rule) of a model of this config
    with the usual layout; LayoutError naming the rule it breaks otherwise. Cached per config."""
    try:
        return _infer(type(config), config.to_json_string(use_diff=False))
    except LayoutError:
        raise
    except (KeyError, ValueError, AttributeError, TypeError) as e:  # no *ForCausalLM class, or one that will not build
        raise LayoutError(f"no causal-LM skeleton could be built from its config ({type(e).__name__}: {e})") from e
