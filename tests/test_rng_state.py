"""Issue 25: a checkpoint's RNG file loads with weights_only (no code from a swapped file)."""

import pickle
import random

import numpy as np
import pytest
import torch

from sparsepo import rng_state


def test_an_older_sparsepos_rng_file_still_restores(tmp_path):
    # what sparsepo wrote before: numpy's state as an ndarray
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, tmp_path / "rng-rank0.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    rng_state.restore(rng_state.load(tmp_path / "rng-rank0.pt"))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_an_rng_file_carrying_a_callable_is_refused(tmp_path, capsys):
    torch.save({"python": random.getstate(), "numpy": Evil(), "torch": torch.get_rng_state()}, tmp_path / "r.pt")
    with pytest.raises(pickle.UnpicklingError):
        rng_state.load(tmp_path / "r.pt")
    assert "this ran" not in capsys.readouterr().out
