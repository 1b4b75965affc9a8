"""Which model families the live reference pipeline can cut, and how: ONE table.

Each entry says where a family keeps its pieces (dotted paths in the ``*ForCausalLM`` model) and
how its own forward makes masks, positions and logits, so the stage modules
(``sparsepo.reference.stages``) reproduce that forward exactly while reusing the model's own
modules and transformers' own mask builders. Adding a family whose forward fits these knobs is one
entry; a family that does not fit is refused (``check_live_supported``) rather than split wrongly.

How the attention mask of decoder layer i is chosen (``layer_attention``), as each forward does:
  causal          always full causal (Llama, Gemma 1, GPT-NeoX, GPT-2, OLMo)
  sliding_window  sliding-window causal on every layer when ``config.sliding_window`` is set, else
                  full (Mistral, Phi-3: no ``layer_types`` in their configs)
  layer_types     ``config.layer_types[i]``: "full_attention" or "sliding_attention" (Qwen2/3, Gemma 2/3)

``check_live_supported(config)`` reads the Hugging Face config only (no weights), so the launcher
calls it before any process loads anything. A family not in the table is read from the model
itself when it has the usual decoder-only layout (``sparsepo.logprobs.layout``: paths and mask rule
by rule, from a meta-device skeleton and its forward's source), or refused with the rule it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL, SLIDING = "full_attention", "sliding_attention"


class PipelineConfigError(ValueError):
    """A pipeline shape or setting that cannot work (raised before any process group is touched)."""


class UnsupportedModelError(PipelineConfigError):
    """A model the live reference pipeline cannot split exactly (use reference.mode=cache)."""


@dataclass(frozen=True, kw_only=True)
class Family:
    name: str
    """Human name, used in messages."""
    embed: str = "model.embed_tokens"
    """Token embedding (Gemma's scales by sqrt(hidden) itself, through a non-persistent buffer)."""
    positions: str | None = None
    """Learned absolute position embedding added to the token embedding (GPT-2)."""
    layers: str = "model.layers"
    norm: str = "model.norm"
    """The final norm, applied before the head."""
    head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    """The model-level rotary module, rebuilt from the config per stage (None: no rotary)."""
    rotary_by_layer_type: bool = False
    """``rotary(hidden, position_ids, layer_type)`` (Gemma 3: local / global rope bases)."""
    masks: str = "causal"
    """causal | sliding_window | layer_types (module docstring)."""
    logit_softcap: bool = False
    """logits = tanh(logits / c) * c with c = ``config.final_logit_softcapping`` when set (Gemma 2/3)."""
    embed_multiplier: str | None = None
    """The config attribute the embeddings are multiplied by (Granite: embedding_multiplier)."""
    logit_multiplier: str | None = None
    """The config attribute the logits are multiplied by (Cohere: logit_scale)."""
    logit_divisor: str | None = None
    """The config attribute the logits are divided by (Granite: logits_scaling)."""
    inferred: bool = False
    """Not in the table: the usual layout, read from the model (``sparsepo.logprobs.layout``)."""

    def logit_scale(self, config) -> float | None:
        """The factor the head's logits are multiplied by (None: none)."""
        if self.logit_multiplier:
            return float(getattr(config, self.logit_multiplier))
        return 1.0 / float(getattr(config, self.logit_divisor)) if self.logit_divisor else None


FAMILIES: dict[str, Family] = {  # keyed by config.model_type
    # Llama, Mistral, Qwen2/3, Gemma, GPT-NeoX, Phi-3 and OLMo follow the usual layout: the rule
    # (sparsepo.logprobs.layout) reads the same entry from the model (tests/test_families.py); their rows
    # stay because the lean log-prob path (sparsepo.logprobs.lean.lean_head) reads this table.
    "llama": Family(name="Llama"),
    "mistral": Family(name="Mistral", masks="sliding_window"),
    "qwen2": Family(name="Qwen2", masks="layer_types"),
    "qwen3": Family(name="Qwen3", masks="layer_types"),
    "gemma": Family(name="Gemma"),
    "gemma2": Family(name="Gemma 2", masks="layer_types", logit_softcap=True),
    "gemma3_text": Family(name="Gemma 3", masks="layer_types", rotary_by_layer_type=True, logit_softcap=True),
    "gpt_neox": Family(name="GPT-NeoX", embed="gpt_neox.embed_in", layers="gpt_neox.layers",
                       norm="gpt_neox.final_layer_norm", rotary="gpt_neox.rotary_emb"),
    "gpt2": Family(name="GPT-2", embed="transformer.wte", positions="transformer.wpe", layers="transformer.h",
                   norm="transformer.ln_f", rotary=None),
    "phi3": Family(name="Phi-3", masks="sliding_window"),
    "olmo": Family(name="OLMo"),
    # real exceptions to the usual layout (any other decoder-only *ForCausalLM: sparsepo.logprobs.layout)
    "granite": Family(name="Granite", embed_multiplier="embedding_multiplier", logit_divisor="logits_scaling"),
    "cohere": Family(name="Cohere", logit_multiplier="logit_scale"),
    "falcon": Family(name="Falcon", embed="transformer.word_embeddings", layers="transformer.h",
                     norm="transformer.ln_f", rotary="transformer.rotary_emb"),
}

_REFUSED = {  # model_type -> why (families that would need more than the table can say)
    "gemma3": "a Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration); save its text model "
              "(Gemma3ForCausalLM, model_type gemma3_text) to run it live",
}

_CACHE_HINT = "Use reference.mode=cache (precompute the reference once) for this model."


def _refuse(config, why: str) -> UnsupportedModelError:
    arch = ",".join(getattr(config, "architectures", None) or []) or "?"
    return UnsupportedModelError(f"live reference pipeline: model family {config.model_type!r} ({arch}) is not "
                                 f"supported: {why}. {_CACHE_HINT}")


def family_of(config) -> Family:
    """The family entry of a Hugging Face config; raises UnsupportedModelError (see check_live_supported)."""
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise _refuse(config, _REFUSED[model_type])
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    from sparsepo.logprobs.layout import LayoutError, infer_layout

    try:
        paths, masks = infer_layout(config)
    except LayoutError as e:
        raise _refuse(config, f"it is not in the table ({', '.join(f.name for f in FAMILIES.values())}) and does not "
                              f"fit the usual decoder-only layout: {e}") from None
    return Family(name=type(config).__name__.removesuffix("Config") or str(model_type), masks=masks, inferred=True,
                  **paths)


def layer_attention(config, index: int) -> str:
    """FULL or SLIDING: which mask decoder layer `index` gets in the model's own forward."""
    masks = family_of(config).masks
    if masks == "layer_types":
        return config.layer_types[index]
    if masks == "sliding_window":
        return SLIDING if getattr(config, "sliding_window", None) is not None else FULL
    return FULL


def check_live_supported(config) -> None:
    """Raise UnsupportedModelError, naming the family and the reason, unless the live pipeline
    reproduces this model's forward exactly. Reads the config only (no weights)."""
    family = family_of(config)
    types = getattr(config, "layer_types", None)
    if family.masks == "layer_types":
        if not types or len(types) < config.num_hidden_layers:
            raise _refuse(config, f"{family.name} needs config.layer_types for every decoder layer, got {types}")
        unknown = sorted(set(types) - {FULL, SLIDING})
        if unknown:
            raise _refuse(config, f"layer types {unknown} (the stages build {FULL} and {SLIDING} masks only)")
        if SLIDING in types and getattr(config, "sliding_window", None) is None:
            raise _refuse(config, f"{SLIDING} layers without config.sliding_window")
    elif types and any(t != FULL for t in types):
        raise _refuse(config, f"layer types {sorted(set(types))}, but {family.name}'s forward builds "
                              f"{'one mask for every layer' if family.masks == 'sliding_window' else 'a full causal mask'}")
    if getattr(config, "alibi", False):
        raise _refuse(config, "alibi=True (ALiBi biases are added to the mask in the model's forward, not rebuilt "
                              "per stage)")
    if getattr(config, "use_bidirectional_attention", False):
        raise _refuse(config, "use_bidirectional_attention=True (bidirectional masks are not rebuilt per stage)")


def get_module(obj, path: str):
    """``model.layers.3`` -> the module at that dotted path (AttributeError / IndexError when absent)."""
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
