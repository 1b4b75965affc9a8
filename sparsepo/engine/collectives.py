"""Collective boilerplate, once: "compute on one rank, hand the result to all" and "every rank tries,
all fail together". Plain torch.distributed (no DeepSpeed): usable in any role's world, and a no-op
wrapper in a single process or before the process group exists.

Why: a rank that raises while its peers wait in a collective leaves them hanging until the
process-group timeout; these helpers turn one rank's failure into the same exception on every rank.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_multi() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _portable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling (so callers can catch its type), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - unpicklable exception types exist (locks, sockets in args)
        return RuntimeError(f"{type(err).__name__}: {err}")


def on_one_rank(fn: Callable[[], T], *, src: int = 0) -> T:
    """Run `fn` on rank `src` only; every rank returns its result, or raises its exception."""
    box: list[Any] = [None]
    if not is_multi() or dist.get_rank() == src:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", _portable(e))
    if is_multi():
        dist.broadcast_object_list(box, src=src)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def on_every_rank(fn: Callable[[], T], *, what: str = "") -> T:
    """Run `fn` on every rank; if any rank raised, every rank raises the first failure, naming its rank."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - shared below
        error = e
    if not is_multi():
        if error is not None:
            raise error
        return result
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, message = failed[0]
        raise RuntimeError(f"{what + ': ' if what else ''}rank {r} failed: {message}")
    return result


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list in a single process)."""
    if not is_multi():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if is_multi():
        dist.barrier()


def gather_tensors(tensor, *, dst: int = 0):
    """Every rank's `tensor` (the same shape and dtype everywhere) on rank `dst`, in rank order; None
    on the others ([tensor] in a single process)."""
    if not is_multi():
        return [tensor]
    import torch

    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())] if dist.get_rank() == dst else None
    dist.gather(tensor, out, dst=dst)
    return out
