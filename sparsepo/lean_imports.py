"""Imports a training process pays for and never uses, avoided where it starts.

transformers and peft import optional packages whenever they are installed, and sparsepo's dependency
tree installs some (sae-lens pulls scipy; QLoRA needs bitsandbytes). Measured on this box (peak RSS of
a fresh interpreter that has imported torch, transformers' Llama, datasets and DeepSpeed, 477 MiB):

| import | RSS | avoided by |
|---|---|---|
| ``scipy.optimize``, from transformers' object-detection losses (``transformers.loss.loss_utils``, imported by every model) | +40 MiB | ``transformers_without_scipy`` |
| bitsandbytes, imported by peft, imported by ``transformers.optimization`` (the LR schedule) | +51 MiB, +5 imported eagerly | ``bitsandbytes_without_compile`` |

DeepSpeed's Muon module has the same problem as bitsandbytes (``engine.policy.import_muon_eagerly``,
kept in ``engine`` with the other DeepSpeed imports). Each function is a no-op when its module is
already imported or its package is not installed, and puts back what it changed.
"""

from __future__ import annotations

import importlib.util
import sys


def installed(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


def transformers_without_scipy() -> None:
    """Import transformers' loss modules with ``transformers.utils.is_scipy_available`` answering False.

    Its object-detection losses (DETR and kin) import ``scipy.optimize.linear_sum_assignment`` at import
    time when scipy is installed, and ``transformers.modeling_utils`` imports them for every model. A
    causal LM never runs those losses (they would say that they need scipy); nothing else changes:
    any later ``import scipy`` works as usual. Call it before any model class is imported."""
    if "transformers.loss.loss_utils" in sys.modules or not installed("scipy") or not installed("transformers"):
        return
    import transformers.utils as tu

    real = tu.is_scipy_available
    tu.is_scipy_available = lambda: False
    try:
        import transformers.loss.loss_utils  # noqa: F401
    finally:
        tu.is_scipy_available = real


def bitsandbytes_without_compile() -> None:
    """Import bitsandbytes with ``torch.compile`` the identity.

    It wraps its fallback kernels in ``torch.compile`` at import, which loads torch._dynamo's backends,
    functorch, sympy and networkx; peft imports it whenever it is installed, and transformers imports
    peft whenever *that* is installed (``transformers.trainer_utils``, imported by the LR schedule's
    ``transformers.optimization``). A run without 4-bit layers never calls those kernels; a QLoRA run
    imports bitsandbytes as it is (the caller, ``engine.policy.PolicyEngine.build``, skips this)."""
    if "bitsandbytes" in sys.modules or not installed("bitsandbytes"):
        return
    import torch

    compile_fn = torch.compile

    def eager(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    torch.compile = eager
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken bitsandbytes is left for peft / QLoRA's check to report
        for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
            del sys.modules[name]
    finally:
        torch.compile = compile_fn
