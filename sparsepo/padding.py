"""Models whose log-probs for a row depend on its batch mates, and the one length every role pads to.

transformers' rotary update for `longrope` (Phi-3-128k, Phi-3.5, Phi-4-mini) and `dynamic` NTK
scaling reads `seq_len = max(position_ids) + 1`, the batch's *padded* length: past a threshold
(longrope: `original_max_position_embeddings`, dynamic: `max_position_embeddings`) longrope swaps
to its long factors and dynamic rescales its base — for every row of the batch, and dynamic keeps
the largest length it has seen (its frequencies also depend on earlier batches). The policy pads
rows in its schedule's micro-batches, the cache in dataset order, so the same row would get two
sets of log-probs.

The design: when such a model can see batches longer than its threshold (`data.max_length` above
it), every role pads every batch to exactly `data.max_length` (`batch_length`). Each row then gets
one set of frequencies whatever its batch mates, epoch or mode — cache, inline and live give the
policy's own numbers, and the cache (one record per row, reused across epochs) stays valid.
Scoring cache rows in the policy's batches instead would tie the cache to one schedule (batch size,
ranks, seed) and still break on a second epoch's reshuffled batches. The price is compute on
padding for these models only; the cache key records the length (`reference_role.offline.cache_settings`).
"""

from __future__ import annotations

import logging

log = logging.getLogger("sparsepo")


def _rope_sets(config) -> list[dict]:
    """The rope parameter dicts of a config (one per layer type for Gemma-3-style configs)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    nested = [v for v in params.values() if isinstance(v, dict)]
    return nested if nested and len(nested) == len(params) else [params]


def padding_dependence(config) -> tuple[str, int] | None:
    """(why, threshold) when this Hugging Face config's rope makes a row's output depend on the
    batch's padded length once that length passes `threshold`; None when padding cannot matter.
    A rule read from the config alone (the rope type), as transformers' `dynamic_rope_update` does."""
    for params in _rope_sets(config):
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type == "longrope":
            limit = params.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None) or config.max_position_embeddings
            return (f"rope type 'longrope' switches every row of a batch to its long factors once the batch's "
                    f"padded length passes original_max_position_embeddings={limit}", int(limit))
        if "dynamic" in rope_type:
            limit = config.max_position_embeddings
            return (f"rope type {rope_type!r} rescales its base for every row of a batch once the batch's padded "
                    f"length passes max_position_embeddings={limit} (and keeps the longest length it has seen)",
                    int(limit))
    return None


def fixed_length(dependence: tuple[str, int] | None, max_length: int) -> int | None:
    """The length every batch is padded to (None: pad to the longest row, as usual)."""
    return max_length if dependence is not None and max_length > dependence[1] else None


def model_paths(cfg) -> list[str]:
    """The models whose numbers a run compares: the policy and the frozen reference (one path when equal)."""
    return list(dict.fromkeys([cfg.model.path, cfg.reference.path or cfg.model.path]))


def batch_length(cfg, *, announce: bool = False) -> int | None:
    """The fixed padded length of every batch of this run (policy, cache, inline and live alike), or
    None. Reads the models' configs only. `announce`: log the warning (once per run, on one rank)."""
    from transformers import AutoConfig

    length = None
    for path in model_paths(cfg):
        try:  # no download here: a model that is neither on disk nor in the hub cache fails in its own load
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            continue
        dependence = padding_dependence(config)
        if dependence is None:
            continue
        mine = fixed_length(dependence, cfg.data.max_length)
        length = length or mine  # every path gives max_length or None
        if announce:
            then = (f"padding every batch of every role to data.max_length={mine} so that a row's log-probs do "
                    f"not depend on its batch mates" if mine is not None else
                    f"data.max_length={cfg.data.max_length} keeps every batch at or below it, so padding does not "
                    f"change the numbers here (a larger data.max_length pads every batch to it)")
            log.warning("%s: its output depends on padding: %s; %s", path, dependence[0], then)
    return length
