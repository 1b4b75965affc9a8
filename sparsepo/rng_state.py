"""A process's RNG state (python, numpy, torch, cuda) as a checkpoint file that loads with
`torch.load(weights_only=True)`: tensors and plain values only, so a swapped file cannot run code.
Files written before (numpy's state as an ndarray) still load: numpy's array reconstruction is allowed,
no other global."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def capture() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load(path: str | Path) -> dict:
    """The state `capture` wrote (or an older sparsepo's), loaded without unpickling anything else."""
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(path, weights_only=True)


def restore(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
