"""Imports a training process pays for and never uses, avoided where it starts.

transformers and peft import optional packages whenever they are installed, and sparsepo's dependency
tree installs some (sae-lens pulls scipy; QLoRA needs bitsandbytes). Measured on this box (peak RSS of
a fresh interpreter that has imported torch, transformers' Llama, datasets and DeepSpeed, 477 MiB):

| import | RSS | avoided by |
|---|---|---|
| ``scipy.optimize``, from transformers' object-detection losses (``transformers.loss.loss_utils``, imported by every model) | +40 MiB | ``transformers_without_scipy`` |
| bitsandbytes, imported by peft, imported by ``transformers.optimization`` (the LR schedule) | +51 MiB, +5 imported eagerly | ``bitsandbytes_offline(eager=True)`` |
| peft (and with it bitsandbytes), imported by ``transformers.trainer_utils`` in a run without LoRA | +10 MiB | ``transformers_without_peft`` |
| ``scipy.io``, imported by ``datasets``' streaming patch of every dataset builder (``load_dataset``) | +12 MiB | ``datasets_patch_imported_only`` |

The last two answer a question exactly rather than skip work: "is this a PeftModel?" is False while peft
was never imported, and a module nobody imported holds no attribute for datasets to patch.

DeepSpeed's Muon module has the same problem as bitsandbytes (``engine.policy.import_muon_eagerly``,
kept in ``engine`` with the other DeepSpeed imports). Each function is a no-op when its module is
already imported or its package is not installed, and puts back what it changed.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager


def installed(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


@contextmanager
def _answering_false(module, check: str):
    """``module.<check>()`` answers False inside the block; the real function is yielded and put back."""
    real = getattr(module, check)
    setattr(module, check, lambda: False)
    try:
        yield real
    finally:
        setattr(module, check, real)


def transformers_without_scipy() -> None:
    """Import transformers' loss modules with ``transformers.utils.is_scipy_available`` answering False.

    Its object-detection losses (DETR and kin) import ``scipy.optimize.linear_sum_assignment`` at import
    time when scipy is installed, and ``transformers.modeling_utils`` imports them for every model. A
    causal LM never runs those losses (they would say that they need scipy); nothing else changes:
    any later ``import scipy`` works as usual. Call it before any model class is imported."""
    if "transformers.loss.loss_utils" in sys.modules or not installed("scipy") or not installed("transformers"):
        return
    import transformers.utils as tu

    with _answering_false(tu, "is_scipy_available"):
        import transformers.loss.loss_utils  # noqa: F401


@contextmanager
def _hub_kernels_refused():
    """Inside the block ``kernels.get_kernel`` fails at once, as it does offline. bitsandbytes' CPU backend
    calls it *at import* on a CPU with AVX512-bf16, asking the Hugging Face Hub for an optional 4-bit
    GEMM (an inference-only layout sparsepo turns off: ``lora.portable_4bit``): with a network that is a
    request to the Hub from every training process, and on a compute node whose DNS drops packets a
    stall. Refused, bitsandbytes keeps its own kernel."""
    kernels = sys.modules.get("kernels")
    if kernels is None:
        sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
        try:
            yield
        finally:
            if sys.modules.get("kernels", 0) is None:
                del sys.modules["kernels"]
        return

    def refused(*_args, **_kwargs):
        raise RuntimeError("sparsepo fetches no kernel from the Hugging Face Hub")

    real = kernels.get_kernel
    kernels.get_kernel = refused
    try:
        yield
    finally:
        kernels.get_kernel = real


def bitsandbytes_offline(*, eager: bool = False) -> None:
    """Import bitsandbytes (when installed and not yet imported) without its Hub request
    (``_hub_kernels_refused``). Call it before peft is imported: peft imports bitsandbytes whenever it
    is installed.

    ``eager=True`` (a run without 4-bit layers): ``torch.compile`` is the identity meanwhile.
    bitsandbytes wraps its fallback kernels in ``torch.compile`` at import, which loads torch._dynamo's
    backends, functorch, sympy and networkx; peft imports it, and transformers imports peft whenever
    *that* is installed (``transformers.trainer_utils``, imported by the LR schedule's
    ``transformers.optimization``). A run without 4-bit layers never calls those kernels; a QLoRA run
    (``engine.policy.PolicyEngine.build`` knows which) keeps them compiled. A broken bitsandbytes is left
    for peft or QLoRA's check (``lora.qlora_problem``) to report."""
    if "bitsandbytes" in sys.modules or not installed("bitsandbytes"):
        return
    import torch

    compile_fn = torch.compile

    def identity(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    if eager:
        torch.compile = identity
    try:
        with _hub_kernels_refused():
            import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001
        for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
            del sys.modules[name]
    finally:
        torch.compile = compile_fn


def transformers_without_peft() -> None:
    """Import ``transformers.trainer_utils`` (imported by ``transformers.optimization``: the LR schedule)
    without peft, and answer its "is peft available" as "has peft been imported".

    trainer_utils imports ``PeftModel`` whenever peft is installed, only to ask ``isinstance(model,
    PeftModel)``; no model is a PeftModel unless peft was imported. The answer it gets instead imports
    the two names it needs the first time peft is in ``sys.modules`` (a LoRA run imports peft before
    its model, ``sparsepo.lora``). A no-op when trainer_utils or peft is already imported."""
    if "transformers.trainer_utils" in sys.modules or "peft" in sys.modules or not installed("peft") \
            or not installed("transformers"):
        return
    import transformers.utils as tu

    with _answering_false(tu, "is_peft_available") as real:
        import transformers.trainer_utils as trainer_utils

    def peft_imported() -> bool:
        if "peft" not in sys.modules or not real():
            return False
        from peft import PeftMixedModel, PeftModel

        trainer_utils.PeftModel, trainer_utils.PeftMixedModel = PeftModel, PeftMixedModel
        return True

    trainer_utils.is_peft_available = peft_imported


def datasets_patch_imported_only() -> None:
    """Let ``datasets``' streaming patch (run on every dataset builder's module by ``load_dataset``, local
    files included) look only at modules already imported.

    To patch ``scipy.io.loadmat``, ``pandas.read_excel`` and kin in a builder's module it imports each
    of those modules, then looks for a global of the builder's module that *is* it; a module never
    imported cannot be such a global, so answering "not found" for it changes nothing patched."""
    if not installed("datasets"):
        return
    import datasets.utils.patching as patching

    if getattr(patching.import_module, "imported_only", False):
        return

    def imported_only(name: str, package: str | None = None):
        if name in sys.modules:
            return sys.modules[name]
        raise ModuleNotFoundError(f"{name} is not imported", name=name)

    imported_only.imported_only = True
    patching.import_module = imported_only


def lean_training_process() -> None:
    """What ``sparsepo.train`` calls first, before any model class or dataset is imported: every
    function above but ``bitsandbytes_offline`` (the policy engine's, which knows about QLoRA)."""
    transformers_without_scipy()
    transformers_without_peft()
    datasets_patch_imported_only()
