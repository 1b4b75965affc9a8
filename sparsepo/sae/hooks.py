"""Reading layer ℓ's residual stream out of a Hugging Face causal LM with a forward hook.

The hook sits on the decoder layer itself, so it works the same on a plain model, a DeepSpeed
engine (ZeRO-3 gathers a layer's parameters around its forward; what the layer returns is an
ordinary tensor) and a PEFT wrapper. `output_hidden_states=True` would give the same tensor for
ℓ < L-1, but keeps every layer's states alive and, for the last layer, returns them after the
final norm.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

# Where common HF causal LMs keep their decoder layers, tried in order on the unwrapped model.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style) in transformers 5
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "base_model.model.model.layers",  # PEFT around a Llama-like model
)


def _unwrap(model: nn.Module) -> nn.Module:
    # DeepSpeedEngine and DistributedDataParallel keep the real model in `.module`.
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (or of the engine wrapping it)."""
    inner = _unwrap(model)
    for path in _LAYER_PATHS:
        obj: Any = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(
        f"cannot find the decoder layers of {type(inner).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}. FPO's SAE hook supports Llama-like causal LMs "
        f"(model.model.layers); add this model's path to sparsepo.sae.hooks._LAYER_PATHS"
    )


class ResidualCapture:
    """Holds the output of one decoder layer from the latest forward that ran through it."""

    def __init__(self, layer: int):
        self.layer = layer
        self.hidden: torch.Tensor | None = None  # (N,T,D), still attached to the autograd graph
        self.calls = 0

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        # transformers 5 decoder layers return a tensor; older ones (and some models) a tuple.
        self.hidden = output[0] if isinstance(output, (tuple, list)) else output
        self.calls += 1

    def take(self) -> torch.Tensor:
        """The captured hidden states, releasing the reference (so activation memory can go)."""
        if self.hidden is None:
            raise RuntimeError(
                f"no forward ran through decoder layer {self.layer} inside capture_residual "
                f"(or it was already taken)"
            )
        hidden, self.hidden = self.hidden, None
        return hidden


@contextmanager
def capture_residual(model: nn.Module, layer: int) -> Iterator[ResidualCapture]:
    """Capture the residual stream after decoder layer `layer` (sae-lens `blocks.{layer}.hook_resid_post`).

    The stored tensor keeps its graph: gradients of anything computed from it reach the policy.
    With gradient checkpointing the recompute in backward fires the hook again; call `take()`
    right after the forward so the recomputed tensor is not what a later reader sees.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range for a model with {len(layers)} decoder layers")
    cap = ResidualCapture(layer)
    handle = layers[layer].register_forward_hook(cap.hook)
    try:
        yield cap
    finally:
        handle.remove()  # the capture keeps its last tensor until take(), so it can be read after the block


class _StopForward(Exception):
    pass


def _field(batch: Any, name: str) -> torch.Tensor:
    value = batch.get(name) if isinstance(batch, dict) else getattr(batch, name, None)
    if value is None:
        raise KeyError(f"batch has no '{name}' (collect_activations needs input_ids, attention_mask, response_mask)")
    return value


@torch.no_grad()
def collect_activations(model: nn.Module, batches: Iterable[Any], layer: int, *,
                        max_tokens: int | None = None, stop_early: bool | None = None,
                        progress: bool = True) -> torch.Tensor:
    """(M,D) float32 CPU tensor of layer-`layer` residuals at response positions (response_mask=1).

    `batches` yields dicts (or collated objects) with input_ids, attention_mask, response_mask.
    `stop_early` aborts each forward right after layer `layer` (skipping the later layers and the
    LM head); it defaults to on, except for ZeRO-3 partitioned models whose parameter gathering
    an aborted forward would leave half done.
    """
    from tqdm.auto import tqdm

    if stop_early is None:
        stop_early = not any(hasattr(p, "ds_id") for p in model.parameters())
    device = next(model.parameters()).device
    cap = ResidualCapture(layer)

    def hook(module, args, output):
        cap.hook(module, args, output)
        if stop_early:
            raise _StopForward

    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range for a model with {len(layers)} decoder layers")
    handle = layers[layer].register_forward_hook(hook)
    chunks: list[torch.Tensor] = []
    total = 0
    bar = tqdm(desc=f"activations layer {layer}", unit="tok", disable=not progress)
    was_training = model.training
    model.eval()  # no dropout in the activations the SAE learns from
    try:
        for batch in batches:
            ids = _field(batch, "input_ids").to(device)
            attn = _field(batch, "attention_mask").to(device)
            mask = _field(batch, "response_mask").to(device).bool()
            try:
                model(input_ids=ids, attention_mask=attn, use_cache=False)
            except _StopForward:
                pass
            acts = cap.take()[mask].float().cpu()
            chunks.append(acts)
            total += acts.shape[0]
            bar.update(acts.shape[0])
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        handle.remove()
        bar.close()
        model.train(was_training)
    if not chunks or total == 0:
        raise ValueError("collect_activations saw no response tokens (empty batches or all-zero response_mask)")
    out = torch.cat(chunks)
    return out[:max_tokens] if max_tokens is not None else out
