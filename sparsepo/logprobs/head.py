"""One ``Head`` per loaded model: a forward's output -> the per-position fields a caller asks for.

    head = Head.for_model(model, chunk)   # bound once, where the model is loaded
    got = head(input_ids, attention_mask, mask, topk=K, ids=ids, entropy=True, sq_mass=True)
    # token_logps (N,T), seq_logps (N,), topk_logps / topk_ids (N,T,K), logps_at (N,T,K'),
    # entropy (N,T), log_sq_mass (N,T): the same keys and numbers on every path

Which path runs is chosen once, by ``choose_head``: the plain one (``PlainHead``: the model's full
(N,T,V) logits, ``plain.Logits``) or the lean one (``LeanPathHead``: the last hidden state and the
model's ``lm_head`` run ``chunk`` response positions at a time, ``lean.HeadInput``). A fused GPU
kernel plugs in as a third ``Head`` returned by ``choose_head``; no caller changes.

``forward`` and ``fields`` are separate for callers that read one forward twice (SPO's samples:
the support ids first, then the log-probs at them). ``model.logits_chunk`` is read from the config
here only (``head_chunk``).
"""

from __future__ import annotations

from torch import Tensor, nn

from sparsepo.logprobs.lean import HeadInput, LeanHead, hidden_forward, lean_head, soft_cap
from sparsepo.logprobs.plain import Logits

FIELDS = ("token_logps", "seq_logps", "topk_logps", "topk_ids", "logps_at", "entropy", "log_sq_mass")
"""Every key a head returns on both paths (``fields``' flags say which); the plain path adds ``logit_mean``."""


def head_chunk(cfg) -> int:
    """``model.logits_chunk``: response positions per head chunk (0: the plain path). The one read of it."""
    return cfg.model.logits_chunk


def as_output(out: Tensor | HeadInput | Logits) -> HeadInput | Logits:
    """A forward's output as something with ``fields``: raw (N,T,V) logits (a pipeline's plain last
    stage, tests) become ``plain.Logits``."""
    return Logits(out) if isinstance(out, Tensor) else out


def fields(out: Tensor | HeadInput | Logits, input_ids: Tensor, mask: Tensor, *, topk: int = 0,
           ids: Tensor | None = None, entropy: bool = False, sq_mass: bool = False,
           logit_mean: bool = False) -> dict[str, Tensor]:
    """The asked fields (``FIELDS``) of one forward's output, zero outside ``mask`` (``logit_mean``: the
    plain path only)."""
    return as_output(out).fields(input_ids, mask, topk=topk, ids=ids, entropy=entropy, sq_mass=sq_mass,
                                 logit_mean=logit_mean)


class Head:
    """A loaded model (an HF causal LM, or the ``PolicyEngine`` / DeepSpeed engine wrapping one: called
    as given, so its hooks run) and the way its output becomes log-probs."""

    chunk = 0

    def __init__(self, model):
        self.model = model

    @staticmethod
    def for_model(model, chunk: int) -> "Head":
        """The head for ``model`` with ``chunk`` response positions per head chunk (``choose_head``)."""
        return choose_head(model, chunk)

    @staticmethod
    def for_layers(lm_head: nn.Module, softcap: float | None, chunk: int, *, scale: float | None = None) -> "StageHead":
        """The head of a pipeline's last stage, which holds the model's ``lm_head`` but not the model
        (``choose_head``). ``scale``: the family's logit multiplier (Cohere, Granite; the plain path)."""
        return choose_head(None, chunk, lm_head=lm_head, softcap=softcap, scale=scale)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> HeadInput | Logits:
        """One forward of the model; its output for ``fields``."""
        raise NotImplementedError

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, **asks) -> dict[str, Tensor]:
        """``fields(self.forward(input_ids, attention_mask), input_ids, mask, **asks)``."""
        return fields(self.forward(input_ids, attention_mask), input_ids, mask, **asks)


class PlainHead(Head):
    """The model's own forward and its full logits."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Logits:
        return Logits(self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits)


class LeanPathHead(Head):
    """The model's forward for the last hidden state only, then its head ``chunk`` positions at a time
    (``sparsepo.logprobs.lean``)."""

    def __init__(self, model, chunk: int):
        super().__init__(model)
        self.chunk = chunk

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> HeadInput:
        src = hidden_forward(self.model, input_ids, attention_mask, self.chunk)
        if src is None:  # choose_head checked the family; a model that changed since is a bug
            raise RuntimeError(f"lean log-probs: {type(self.model).__name__} lost its lean head after loading")
        return src


class StageHead:
    """A pipeline's last stage: the final norm's output (N,T,H) -> what ``fields`` reads. Plain: the
    logits (N,T,V) in the model dtype, scaled and soft-capped as the model's forward does (``chunk`` 0);
    lean: a ``lean.HeadInput`` (the hidden state and the head, run ``chunk`` response positions at a time)."""

    def __init__(self, lm_head: nn.Module, softcap: float | None, chunk: int = 0, scale: float | None = None):
        self.lm_head, self.softcap, self.chunk, self.scale = lm_head, softcap, chunk, scale

    def __call__(self, hidden: Tensor) -> Tensor | HeadInput:
        if self.chunk > 0:
            return HeadInput(hidden, LeanHead(self.lm_head, self.softcap), self.chunk)
        logits = self.lm_head(hidden)
        return soft_cap(logits if self.scale is None else logits * self.scale, self.softcap)


def choose_head(model, chunk: int, *, lm_head: nn.Module | None = None, softcap: float | None = None,
                scale: float | None = None):
    """The one place the path is chosen: lean when ``chunk`` > 0 and the head can run in chunks (a
    model the family table knows, ``lean.lean_head``; a pipeline stage's ``lm_head`` an ``nn.Linear``
    and its logits unscaled),
    else plain. A fused kernel's head would be chosen here. With ``lm_head`` (and no model): the
    ``StageHead`` of a pipeline's last stage."""
    if chunk < 0:
        raise ValueError(f"model.logits_chunk={chunk} must be >= 0 (0: the plain path)")
    if model is None:
        lean = chunk > 0 and isinstance(lm_head, nn.Linear) and scale is None
        return StageHead(lm_head, softcap, chunk if lean else 0, scale)
    if chunk > 0 and lean_head(model) is not None:
        return LeanPathHead(model, chunk)
    return PlainHead(model)
