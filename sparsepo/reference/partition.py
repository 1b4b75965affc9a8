"""Where the pipeline cuts a model: pure arithmetic over its L + 2 *items* (embedding, L decoder
layers, final norm + head), no torch. Stage s holds items [parts[s], parts[s+1]).

    stage_parts(2, 3)                      -> [0, 2, 3, 4]   (DeepSpeed's partition_uniform)
    stage_parts(5, 2, "layers")            -> [0, 4, 7]      (decoder layers evenly)
    stage_parts(4, 3, "parameters", sizes) -> minimises the largest stage's parameter count
"""

from __future__ import annotations

from typing import Sequence

from sparsepo.logprobs.families import PipelineConfigError  # noqa: F401 - defined on the ground floor, raised here

PARTITIONS = ("uniform", "layers", "parameters")
"""uniform: the L+2 items (embedding, L decoder layers, head) as evenly as possible over the stages,
DeepSpeed's ``partition_uniform`` (earlier stages get the remainder); layers: the L decoder layers
evenly, the embedding riding on the first stage and the head on the last; parameters: contiguous
items balanced by parameter count (minimise the largest stage)."""


def max_stages(num_layers: int, partition: str = "uniform") -> int:
    """The most pipeline stages a model with `num_layers` decoder layers can be cut into: every stage
    needs at least one item, so L + 2 for uniform / parameters and L for layers."""
    if partition not in PARTITIONS:
        raise PipelineConfigError(f"pipeline partition {partition!r} is not one of {PARTITIONS}")
    return num_layers if partition == "layers" else num_layers + 2


def _uniform_bounds(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's partition_uniform for num_items >= num_parts: chunks of n//p, the first n%p one larger."""
    chunk, residual = divmod(num_items, num_parts)
    bounds = [0]
    for p in range(num_parts):
        bounds.append(bounds[-1] + chunk + (1 if p < residual else 0))
    return bounds


def _balanced_bounds(weights: Sequence[float], num_parts: int) -> list[int]:
    """Contiguous, non-empty parts minimising the largest part's weight (DP; ties: earliest cuts)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[j][i]: smallest max-part weight for items[:i] in j parts; cut[j][i]: where the last part starts
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for j in range(1, num_parts + 1):
        for i in range(j, n - (num_parts - j) + 1):
            for k in range(j - 1, i):
                cost = max(best[j - 1][k], prefix[i] - prefix[k])
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, k
    bounds = [n]
    for j in range(num_parts, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    return bounds[::-1]


def stage_parts(num_layers: int, num_stages: int, partition: str = "uniform",
                item_params: Sequence[int] | None = None) -> list[int]:
    """Item bounds per stage over the L+2 items: stage s holds items [parts[s], parts[s+1]).

    Refuses shapes that leave a stage empty, with the arithmetic."""
    if num_layers < 1:
        raise PipelineConfigError(f"pipeline reference: the model has {num_layers} decoder layers")
    if num_stages < 1:
        raise PipelineConfigError(f"pipeline reference: num_stages={num_stages} must be >= 1")
    limit = max_stages(num_layers, partition)
    if num_stages > limit:
        what = (f"{num_layers} decoder layers (partition='layers' gives every stage at least one decoder layer)"
                if partition == "layers" else
                f"{num_layers} decoder layers + embedding + head = {num_layers + 2} pipeline items")
        raise PipelineConfigError(f"pipeline reference: num_stages={num_stages} > {limit}: the model has {what}, "
                                  f"so at most {limit} stages can each hold something")
    n_items = num_layers + 2
    if partition == "uniform":
        return _uniform_bounds(n_items, num_stages)
    if partition == "layers":
        dec = _uniform_bounds(num_layers, num_stages)  # decoder layer d is item d + 1
        return [0] + [b + 1 for b in dec[1:-1]] + [n_items]
    if item_params is None or len(item_params) != n_items:
        raise PipelineConfigError(f"partition='parameters' needs {n_items} item parameter counts, got "
                                  f"{None if item_params is None else len(item_params)}")
    return _balanced_bounds(item_params, num_stages)
