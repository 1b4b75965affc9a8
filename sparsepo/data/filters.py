"""Length filters on tokenised pairs: SePO's data step (Yang et al. 2024; the authors' token_score.py
drops pairs whose templated prompt is over 1900 tokens or either response under 8 tokens).

    pair_filter = PairFilter(max_prompt_tokens=1900, min_response_tokens=8, owner="method")
    reason = pair_filter.reason(prompt_tokens=2000, chosen_tokens=30, rejected_tokens=5)   # -> (field, why)

Lengths are those before truncation: the prompt's ids as tokenised (specials included), each
response's ids without the eos the pipeline appends. `sparsepo.data.pipeline` applies the filter
after tokenising, inside `load_preference_dataset`, so every path that reads the run's pairs (training,
precompute, inline scoring) sees the same rows; each filtered pair is listed in skipped_rows.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PairFilter:
    max_prompt_tokens: int | None = None
    """Drop a pair whose prompt has more tokens than this (None: no limit)."""
    min_response_tokens: int | None = None
    """Drop a pair where either response has fewer tokens than this (None: no limit)."""
    owner: str = "data"
    """The config section holding the two knobs, named in the skip report's reasons."""

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "min_response_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{self.owner}.{name} must be an integer >= 0 or null (got {value!r})")

    @property
    def active(self) -> bool:
        return self.max_prompt_tokens is not None or bool(self.min_response_tokens)

    def reason(self, *, prompt_tokens: int, chosen_tokens: int, rejected_tokens: int) -> tuple[str, str] | None:
        """(field, reason) for the first limit the pair breaks, or None when it passes."""
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return "prompt", (f"filtered: {prompt_tokens} prompt tokens, more than "
                              f"{self.owner}.max_prompt_tokens={self.max_prompt_tokens}")
        for side, n in (("chosen", chosen_tokens), ("rejected", rejected_tokens)):
            if self.min_response_tokens and n < self.min_response_tokens:
                return side, (f"filtered: {n} {side} tokens, fewer than "
                              f"{self.owner}.min_response_tokens={self.min_response_tokens}")
        return None


def pair_filter_for(cfg) -> PairFilter | None:
    """The run's filter: the method params' max_prompt_tokens / min_response_tokens (SePO), or None.
    Every caller that loads a run's pairs for training or scoring asks here, never builds its own."""
    params = cfg.method.params
    limits = {k: getattr(params, k) for k in ("max_prompt_tokens", "min_response_tokens") if hasattr(params, k)}
    if not limits:
        return None
    f = PairFilter(**limits, owner="method")
    return f if f.active else None
