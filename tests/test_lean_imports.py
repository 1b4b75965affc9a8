"""`lean_imports._hub_kernels_refused`: bitsandbytes' import-time request for a Hub kernel fails at once,
whether or not `kernels` was imported, and everything is put back (the import probes with bitsandbytes
itself are in test_engine_imports.py)."""

from __future__ import annotations

import sys
import types

import pytest

from sparsepo.lean_imports import _hub_kernels_refused


def test_without_kernels_imported_the_import_fails_and_leaves_no_trace(monkeypatch):
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with _hub_kernels_refused():
        with pytest.raises(ImportError):
            from kernels import get_kernel  # noqa: F401
    assert "kernels" not in sys.modules


def test_an_imported_kernels_refuses_get_kernel_and_gets_it_back(monkeypatch):
    calls = []
    fake = types.ModuleType("kernels")
    fake.get_kernel = lambda *args, **kwargs: calls.append(args)
    real = fake.get_kernel
    monkeypatch.setitem(sys.modules, "kernels", fake)
    with _hub_kernels_refused():
        from kernels import get_kernel
        with pytest.raises(RuntimeError, match="no kernel from the Hugging Face Hub"):
            get_kernel("kernels-community/quantization-bitsandbytes", version=1)
    assert calls == [] and sys.modules["kernels"] is fake and fake.get_kernel is real


def test_what_the_block_raises_still_puts_everything_back(monkeypatch):
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with pytest.raises(KeyError):
        with _hub_kernels_refused():
            raise KeyError("boom")
    assert "kernels" not in sys.modules
