"""Log-probs from the last hidden state, chunk by chunk over the response positions: the lean path.

The plain path (``model(...).logits``, then ``logprobs.plain``) holds (N,T,V) float32 logits — at
vocabulary 128k and T 2k the largest tensor of a training step, several times over at its peak
(docs/benchmarks.md, "Lean log-probs"). Here the model's forward runs with ``logits_to_keep=1``
(the head sees one position per row), a hook on the family's final norm (``logprobs.families``:
the head's input) keeps the last hidden state (N,T,H), and the model's own ``lm_head`` (plus the
family's soft-capping, ``soft_cap``) runs on ``chunk`` response positions at a
time, each chunk's log_softmax in float32. Prompt and padding positions never see the head. With
gradients the loop has its own backward (``logprobs.chunked.HeadLogps``: the seam for a fused
kernel), which recomputes one chunk's logits at a time from the saved logsumexp and never holds them all.

**One head call per scoring pass, whatever the chunk count.** All chunks run inside a single
invocation of the ``lm_head`` module (``LeanHead``: its ``forward`` is swapped for the chunk loop
for that one call), so hooks on the module fire once: under ZeRO-3 the head's weight is gathered
once before the loop and released after it, and in the backward gathered once (ZeRO's pre-backward
hook on the call's output) before any chunk is recomputed. Ranks whose response-token counts differ
(so their chunk counts differ) make the same collectives; with one head call per chunk they did
not, and a multi-rank ZeRO-3 run hung (tests/test_lean_zero3.py). At least one (possibly empty)
chunk always runs, so a rank without response tokens still joins the backward's gather.

Alignment as ``logprobs.plain``: the value at position t describes x_t and comes from hidden[t-1].
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsepo.logprobs.chunked import HeadLogps, head_logps
from sparsepo.logprobs.plain import log_sq_mass
from sparsepo.logprobs.families import FAMILIES, get_module

DEFAULT_CHUNK = 128
"""Response positions per head chunk (``model.logits_chunk``); see docs/benchmarks.md for the choice."""


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """tanh(logits / c) * c in the order the Gemma 2/3 forward does it (the model dtype); None: unchanged."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


@dataclass
class HeadInput:
    """The last hidden state of N rows and the head that turns it into logits: what ``head.LeanPathHead``
    (and the pipeline's last stage) hand ``fields`` instead of (N,T,V) logits on the lean path."""

    hidden: Tensor  # (N,T,H) the head's input (after the final norm)
    head: "LeanHead"  # the model's lm_head + soft-capping, run over all chunks in one module call
    chunk: int = DEFAULT_CHUNK

    def fields(self, input_ids: Tensor, mask: Tensor, *, topk: int = 0, ids: Tensor | None = None,
               entropy: bool = False, sq_mass: bool = False, logit_mean: bool = False) -> dict[str, Tensor]:
        """``chunked_logps`` on this input: the keys of ``plain.Logits.fields`` (not ``logit_mean``: the
        lean path never holds the full logits, so TRL's ``logits/*`` metrics are plain-path only)."""
        return chunked_logps(self, input_ids, mask, topk=topk, ids=ids, entropy=entropy, sq_mass=sq_mass)


def _unwrap(model):
    """The Hugging Face model inside a ``PolicyEngine`` / ``DeepSpeedEngine`` (or the model itself)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


class LeanHead:
    """The model's ``lm_head`` (an ``nn.Linear``) and the family's soft-cap ``softcap`` (None: none).

    ``run`` scores all chunks inside one call of the ``lm_head`` module (see the module docstring)."""

    def __init__(self, lm_head: nn.Linear, softcap: float | None = None):
        self.lm_head, self.softcap = lm_head, softcap

    def logits(self, h: Tensor) -> Tensor:
        """(…,H) -> (…,V) logits in the model dtype, soft-capped as the model's forward does. Reads the
        weight directly: call it only inside ``run`` (under ZeRO-3 the weight is gathered there only)."""
        return soft_cap(F.linear(h, self.lm_head.weight, self.lm_head.bias), self.softcap)

    def run(self, h: Tensor, targets: Tensor, ids: Tensor | None, *, chunk: int, topk: int = 0,
            entropy: bool = False, sq_mass: bool = False) -> dict[str, Tensor]:
        """M rows of the head's input h (M,H), their next tokens targets (M,) and optional ids (M,K'):
        {"logps": (M,1+K') float32 (the target's log-prob, then the ids'), with gradients when h or
        the weight has them; with ``topk`` "topk_logps" (M,K) / "topk_ids" (M,K); with ``entropy``
        "entropy" (M,), with ``sq_mass`` "log_sq_mass" (M,)} (no gradient), ``chunk`` rows per logits
        tensor, one ``lm_head`` call."""
        module = self.lm_head
        own = module.__dict__.get("forward")  # an instance-level forward (accelerate hooks) is put back after
        module.forward = lambda h, targets, ids=None: self._chunks(h, targets, ids, chunk, topk, entropy, sq_mass)
        try:  # tensors in, a tuple of tensors out: what ZeRO's and torch's module hooks can see
            out = module(h, targets) if ids is None else module(h, targets, ids)
            names = (("logps",) + (("topk_logps", "topk_ids") if topk else ()) + (("entropy",) if entropy else ())
                     + (("log_sq_mass",) if sq_mass else ()))
            return dict(zip(names, out, strict=True))
        finally:
            if own is None:
                del module.forward
            else:
                module.forward = own

    def _chunks(self, h: Tensor, targets: Tensor, ids: Tensor | None, chunk: int, topk: int,
                entropy: bool, sq_mass: bool) -> tuple[Tensor, ...]:
        at = targets[:, None] if ids is None else torch.cat([targets[:, None], ids], dim=-1)
        stats = functools.partial(chunk_stats, topk=topk, entropy=entropy, sq_mass=sq_mass)
        if torch.is_grad_enabled() and (h.requires_grad or self.lm_head.weight.requires_grad):
            return HeadLogps.apply(h, self.lm_head.weight, self.lm_head.bias, at, chunk, self.softcap,
                                   self.logits, stats)
        logps, _, extra = head_logps(self.logits, h, at, chunk, stats)
        return (logps, *extra)


def chunk_stats(logits: Tensor, lse: Tensor, *, topk: int, entropy: bool, sq_mass: bool) -> list[Tensor]:
    """One chunk's no-gradient fields from its float32 logits (C,V) and logsumexp (C,1): top-K
    log-probs and ids, entropy, log Σ p², those asked, in that order."""
    out = []
    with torch.no_grad():
        if topk:
            values, top_ids = logits.topk(topk, dim=-1)
            out += [values - lse, top_ids]
        if entropy:
            logp = logits - lse
            out.append(-(logp.exp() * logp).sum(-1))
        if sq_mass:
            out.append(log_sq_mass(logits))
    return out


def lean_head(model) -> tuple[nn.Module, LeanHead] | None:
    """(final norm, head) of a causal LM whose family the table knows, whose head is an ``nn.Linear``
    and whose forward takes ``logits_to_keep``; None otherwise (the caller keeps the plain path)."""
    module = _unwrap(model)
    config = getattr(module, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or family.logit_scale(config) is not None or \
            "logits_to_keep" not in inspect.signature(module.forward).parameters:  # scaled logits: the plain path
        return None
    try:
        norm, lm_head = get_module(module, family.norm), get_module(module, family.head)
    except (AttributeError, IndexError):
        return None
    if not isinstance(lm_head, nn.Linear):
        return None
    softcap = getattr(config, "final_logit_softcapping", None) if family.logit_softcap else None
    return norm, LeanHead(lm_head, softcap)


@contextmanager
def _capture_output(module: nn.Module):
    got: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield got
    finally:
        handle.remove()


def hidden_forward(model, input_ids: Tensor, attention_mask: Tensor, chunk: int) -> HeadInput | None:
    """Run ``model`` (a ``PolicyEngine`` or an HF model: called as given, so DeepSpeed's hooks run) for
    the head's input only. None when the model has no lean head (``lean_head``)."""
    found = lean_head(model)
    if found is None:
        return None
    norm, head = found
    with _capture_output(norm) as got:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    if len(got) != 1:
        raise RuntimeError(f"lean log-probs: the final norm ran {len(got)} times in one forward (expected once)")
    return HeadInput(hidden=got[0], head=head, chunk=chunk)


def chunked_logps(src: HeadInput, input_ids: Tensor, mask: Tensor, *, topk: int = 0, ids: Tensor | None = None,
                  entropy: bool = False, sq_mass: bool = False) -> dict[str, Tensor]:
    """The plain path's fields from the hidden state, ``src.chunk`` response positions at a time.

    input_ids (N,T), mask (N,T) 0/1 (never 1 at t=0). Returns token_logps (N,T) (zero outside the
    mask) and seq_logps (N,) — with gradients when the hidden state has them —, with ``topk``
    topk_logps (N,T,K) and topk_ids (N,T,K) long (no gradient; zero outside the mask), with ``ids``
    (N,T,K') logps_at (N,T,K') (the log-probs at those ids, with gradients, zero outside the mask),
    with ``entropy`` entropy (N,T) (no gradient), with ``sq_mass`` log_sq_mass (N,T) (log Σ_v p(v)², no
    gradient; ``plain.log_sq_mass``). Equal to ``plain.Logits.fields`` on the full logits."""
    hidden = src.hidden
    n, t = input_ids.shape
    if src.chunk < 1:
        raise ValueError(f"chunked_logps: chunk={src.chunk} must be >= 1")
    where = (mask[:, 1:] != 0).reshape(-1).nonzero().squeeze(-1)  # flat (n, t-1) of each response token's predictor
    width = max(t - 1, 1)
    pred = (where // width) * t + where % width  # the predicting position in (N*T)
    target = pred + 1
    flat_ids = ids.reshape(n * t, -1)[target] if ids is not None else None
    got = src.head.run(hidden.reshape(n * t, -1)[pred], input_ids.reshape(-1)[target], flat_ids,
                       chunk=src.chunk, topk=topk, entropy=entropy, sq_mass=sq_mass)

    def place(values: Tensor) -> Tensor:
        flat = torch.zeros((n * t, *values.shape[1:]), dtype=values.dtype, device=hidden.device)
        return flat.index_put((target,), values).reshape(n, t, *values.shape[1:])

    logps = place(got["logps"])  # (N,T,1+K')
    token_logps = logps[..., 0].contiguous()  # summed as the plain path sums it (same order, same bits)
    out = {"token_logps": token_logps, "seq_logps": token_logps.sum(-1)}
    if ids is not None:
        out["logps_at"] = logps[..., 1:]
    if topk:
        out["topk_logps"], out["topk_ids"] = place(got["topk_logps"]), place(got["topk_ids"])
    if entropy:
        out["entropy"] = place(got["entropy"])
    if sq_mass:
        out["log_sq_mass"] = place(got["log_sq_mass"])
    return out
