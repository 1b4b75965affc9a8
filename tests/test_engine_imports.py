"""What a training process imports and never uses (`sparsepo.lean_imports`). DeepSpeed's ZeRO path imports its Muon
optimizer module, which runs torch.compile at import (torch._inductor, sympy, networkx: ~50 MB RSS);
`import_muon_eagerly` imports it with DeepSpeed's compile a no-op (docs/benchmarks.md, "Lean log-probs")."""

import subprocess
import sys

import pytest

from conftest import REPO, train_env

pytestmark = pytest.mark.integration  # each test starts an interpreter that imports transformers (~5 s)

PROBE = """
import sys
from sparsepo.engine.policy import import_muon_eagerly
{call}
import deepspeed.runtime.zero.muon.muon_optimizer as m
from deepspeed.runtime import compiler
print(int("torch._inductor" in sys.modules), int(compiler.compile() is __import__("torch").compile),
      int(callable(m.MuonWithAuxAdam)))
"""


@pytest.mark.parametrize("call", [True, pytest.param(False, marks=pytest.mark.slow)])  # the control: slow (budget)
def test_deepspeeds_muon_module_is_imported_without_torch_compile(call):
    code = PROBE.format(call="import_muon_eagerly()" if call else "")
    out = subprocess.run([sys.executable, "-c", code], env=train_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    inductor, compile_restored, muon = map(int, out.stdout.split()[-3:])
    assert compile_restored == 1 and muon == 1
    assert inductor == (0 if call else 1)  # without it the import pulls in torch._inductor (the control)


TRANSFORMERS_PROBE = """
import sys
import transformers.utils as tu
real = tu.is_scipy_available
from sparsepo.lean_imports import transformers_without_scipy
{call}
import transformers.models.llama.modeling_llama
print(int("scipy.optimize" in sys.modules), int(tu.is_scipy_available is real))
"""

BNB_PROBE = """
import sys
import torch
real = torch.compile
import kernels
hub = []  # every request bitsandbytes makes for a Hub kernel, answered as offline
def get_kernel(*args, **kwargs):
    hub.append(args)
    raise RuntimeError("offline")
kernels.get_kernel = get_kernel
from sparsepo.lean_imports import bitsandbytes_offline
{call}
import peft
import bitsandbytes as bnb
from bitsandbytes.functional import has_avx512bf16
x = torch.linspace(-1, 1, 64, dtype=torch.bfloat16)
q, state = bnb.functional.quantize_4bit(x, quant_type="nf4", quant_storage=torch.bfloat16)
err = float((bnb.functional.dequantize_4bit(q, state) - x).abs().max())
print(int(has_avx512bf16()), len(hub), int(kernels.get_kernel is get_kernel),
      int("torch._functorch.partitioners" in sys.modules), int(torch.compile is real), int(err < 0.2))
"""


def probe(code: str, n: int = 3) -> list[int]:
    out = subprocess.run([sys.executable, "-c", code], env=train_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(v) for v in out.stdout.split()[-n:]]


@pytest.mark.parametrize("call", [True, pytest.param(False, marks=pytest.mark.slow)])  # the control: slow (budget)
def test_transformers_models_are_imported_without_scipy_optimize(call):
    """transformers' object-detection losses import scipy.optimize (+40 MiB) whenever scipy is installed
    (sae-lens installs it); `transformers_without_scipy` imports them with scipy reported missing, and puts
    transformers' own check back."""
    pytest.importorskip("scipy")
    scipy_optimize, restored = probe(TRANSFORMERS_PROBE.format(call="transformers_without_scipy()" if call else ""))[-2:]
    assert restored == 1
    assert scipy_optimize == (0 if call else 1)  # the control: without it the model import pulls scipy.optimize


@pytest.mark.parametrize("call", [True, pytest.param(False, marks=pytest.mark.slow)])  # the control: slow (budget)
def test_bitsandbytes_is_imported_without_torch_compile_and_still_quantises(call):
    """peft imports bitsandbytes, which runs torch.compile at import (functorch, sympy, networkx: +51 MiB)
    and, on a CPU with AVX512-bf16, asks the Hub for a kernel; `bitsandbytes_offline(eager=True)` imports it
    first, eagerly and without the request: torch.compile and kernels.get_kernel are put back, NF4 still works."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("kernels")
    avx512bf16, requests, get_kernel_back, functorch, restored, works = probe(
        BNB_PROBE.format(call="bitsandbytes_offline(eager=True)" if call else ""), n=6)
    assert restored == 1 and works == 1 and get_kernel_back == 1
    assert functorch == (0 if call else 1)
    assert requests == (0 if call else avx512bf16)  # the control asks the Hub exactly where the CPU has it


PEFT_PROBE = """
import sys
from sparsepo.lean_imports import transformers_without_peft
{call}
import transformers.optimization
import transformers.trainer_utils as tu
imported = int("peft" in sys.modules)
import torch
plain = tu._is_peft_model(torch.nn.Linear(2, 2))
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
wrapped = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"]))
print(imported, int(not plain), int(tu._is_peft_model(wrapped)))
"""

DATASETS_PROBE = """
import json, sys, tempfile
from sparsepo.lean_imports import datasets_patch_imported_only
{call}
import datasets
path = tempfile.mkdtemp() + "/rows.jsonl"
open(path, "w").write(json.dumps({{"prompt": "a", "chosen": "b", "rejected": "c"}}) + "\\n")
ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=tempfile.mkdtemp())
print(int("scipy.io" in sys.modules), int(ds[0]["chosen"] == "b"), int(len(ds) == 1))
"""


@pytest.mark.parametrize("call", [True, pytest.param(False, marks=pytest.mark.slow)])  # the control: slow (budget)
def test_transformers_trainer_utils_is_imported_without_peft_and_still_knows_a_peft_model(call):
    """transformers.optimization (the LR schedule) imports trainer_utils, which imports peft (+10 MiB, and
    bitsandbytes) whenever it is installed; `transformers_without_peft` answers "is a PeftModel?" from what
    was imported: False for a plain module, True for a peft model built afterwards."""
    pytest.importorskip("peft")
    imported, plain_ok, peft_ok = probe(PEFT_PROBE.format(call="transformers_without_peft()" if call else ""))
    assert plain_ok == 1 and peft_ok == 1
    assert imported == (0 if call else 1)  # the control: without it the schedule's import pulls peft


@pytest.mark.parametrize("call", [True, pytest.param(False, marks=pytest.mark.slow)])  # the control: slow (budget)
def test_load_dataset_does_not_import_scipy_io(call):
    """datasets' streaming patch imports scipy.io (+12 MiB) to patch its loadmat in every builder module;
    `datasets_patch_imported_only` lets it see imported modules only, and a local JSON file still loads."""
    pytest.importorskip("scipy")
    scipy_io, value, rows = probe(DATASETS_PROBE.format(call="datasets_patch_imported_only()" if call else ""))
    assert value == 1 and rows == 1
    assert scipy_io == (0 if call else 1)
