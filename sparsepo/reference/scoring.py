"""The one scoring function: logits (and decoder layer ℓ's output) -> what the reference serves.

``score`` is used by every path that scores with the reference: inline and precompute
(``sparsepo.reference.scorer.score_batch``, after a full forward) and the pipeline's last stage
(``ScoreFn``, the PipelineModule's ``loss_fn``). So cache, inline and live modes produce the same
numbers by construction.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

from sparsepo.logprobs.head import fields
from sparsepo.logprobs.lean import HeadInput
from sparsepo.logprobs.plain import Logits
from sparsepo.reference.partition import PipelineConfigError

SCORE_FIELDS = ("seq_logps", "token_logps", "topk_ids", "topk_logps")
"""What the last stage computes from the logits."""
FEATURE_FIELDS = ("feature_ids", "feature_values")
"""What it computes from decoder layer ℓ's output with an SAE (``build_pipeline(..., features=)``)."""
REQUEST_FIELDS = ("request_logps",)
"""What it computes at ids the policy sent with its samples (SPO's KL support: ``score(request_ids=)``)."""
SERVED_FIELDS = SCORE_FIELDS + FEATURE_FIELDS + REQUEST_FIELDS


class _Captured:
    """Stands in for ``sparsepo.sae.ResidualCapture``: hands ``features.reference`` a hidden_ℓ."""

    def __init__(self, hidden: Tensor):
        self.hidden = hidden

    def take(self) -> Tensor:
        hidden, self.hidden = self.hidden, None
        return hidden


class _Rows:
    """The part of a collated batch ``features.reference`` reads."""

    def __init__(self, response_mask: Tensor):
        self.response_mask = response_mask


def score(logits: Tensor | Logits | HeadInput, input_ids: Tensor, response_mask: Tensor, outputs: Sequence[str], *,
          topk: int | None, features=None, hidden: Tensor | None = None,
          request_ids: Tensor | None = None) -> dict[str, Tensor]:
    """The reference's ``outputs`` for N rows, by name, in the order asked.

    From logits (N,T,V) (cast to float32): seq_logps (N,), token_logps (N,T) (position t from
    logits[t-1], position 0 is 0, zero outside the response mask: ``logprobs.plain.response_logps``),
    topk_logps / topk_ids (N,T,K) (the top ``topk`` next-token log-probs, zero outside the
    response). With ``features`` (an ``SAEFeatures``-like object) and ``hidden`` (decoder layer ℓ's
    output (N,T,D)): feature_ids (N,k) long / feature_values (N,k), the SAE activations pooled over
    the response tokens and their top-k, from ``features.reference``. With ``request_ids`` (N,T,K')
    (SPO: the ids the policy asks about at each sample position): request_logps (N,T,K'), the
    log-probs at those ids, zero outside the response. Raises when an output cannot
    be produced (so a scorer never serves less than asked).

    ``logits`` may instead be what a ``logprobs.head.Head`` forward returns: ``plain.Logits``, or a
    ``lean.HeadInput`` (the last hidden state and the model's head: the same fields, computed chunk by
    chunk over the response positions, the lean path)."""
    wants_topk = "topk_ids" in outputs or "topk_logps" in outputs
    if wants_topk and not topk:
        raise ValueError(f"score: {[o for o in outputs if o.startswith('topk')]} need topk >= 1, got {topk}")
    got = fields(logits, input_ids, response_mask, topk=topk if wants_topk else 0, ids=request_ids)
    if "logps_at" in got:
        got["request_logps"] = got.pop("logps_at")
    if features is not None:
        if hidden is None:
            raise RuntimeError("score: an SAE was given but no layer output (hidden) to read")
        got.update(features.reference(_Captured(hidden), _Rows(response_mask)))
    missing = [o for o in outputs if o not in got]
    if missing:
        raise RuntimeError(f"reference scorer produced no {missing}: no scorer extension provides them")
    return {o: got[o] for o in outputs}


def score_fields(topk: int | None, features: bool, requests: bool = False) -> tuple[str, ...]:
    """The names of the last stage's outputs, in order."""
    return (("seq_logps", "token_logps") + (("topk_logps", "topk_ids") if topk else ())
            + (FEATURE_FIELDS if features else ()) + (REQUEST_FIELDS if requests else ()))


class ScoreFn:
    """The PipelineModule ``loss_fn``: ``(head output, (input_ids, response_mask[, request_ids])) ->
    score(...)`` as a tuple in ``fields`` order (request_ids when built with ``requests=True``).

    The head output is the logits, or (logits, hidden_ℓ) when the pipeline carries a feature layer.
    ``feature_layer`` is set on every stage (the decoder item that captures is built from it);
    ``features`` (the SAE) only on the last stage, the only one that calls this. ``after_micro_batch``,
    when set (``sparsepo.engine.pipeline``), runs before each micro-batch's outputs are returned."""

    __name__ = "score"

    def __init__(self, topk: int | None, *, feature_layer: int | None = None, features=None, requests: bool = False):
        if features is not None and feature_layer is None:
            feature_layer = features.layer
        if features is not None and features.layer != feature_layer:
            raise PipelineConfigError(f"pipeline reference: the SAE reads layer {features.layer}, the pipeline "
                                      f"carries layer {feature_layer}")
        self.topk = topk
        self.requests = requests  # labels carry a third tensor, the request ids (SPO's samples)
        self.feature_layer = feature_layer
        self.features = features
        self.after_micro_batch: Callable[[], None] | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the returned tensors, in order."""
        return score_fields(self.topk, self.feature_layer is not None, self.requests)

    def __call__(self, outputs, labels) -> tuple[Tensor, ...]:
        input_ids, response_mask, *rest = labels
        request_ids = rest[0] if self.requests else None
        hidden = None
        if isinstance(outputs, (tuple, list)):
            outputs, hidden = outputs[0], (outputs[1] if len(outputs) > 1 else None)
        if self.feature_layer is not None and (self.features is None or hidden is None):
            raise RuntimeError(f"pipeline reference: feature layer {self.feature_layer} needs the SAE on the last "
                               f"stage and layer {self.feature_layer}'s output from the pipeline "
                               f"(SAE {'missing' if self.features is None else 'present'}, "
                               f"layer output {'missing' if hidden is None else 'present'})")
        fields = self.fields
        got = score(outputs, input_ids, response_mask, fields, topk=self.topk,
                    features=self.features if self.feature_layer is not None else None, hidden=hidden,
                    request_ids=request_ids)
        if self.after_micro_batch is not None:
            self.after_micro_batch()
        return tuple(got[name] for name in fields)
