"""What the policy engine costs before its first step: DeepSpeed's ZeRO path imports its Muon
optimizer module, which runs torch.compile at import (torch._inductor, sympy, networkx: ~50 MB RSS);
`import_muon_eagerly` imports it with DeepSpeed's compile a no-op (docs/benchmarks.md, "Lean log-probs")."""

import subprocess
import sys

import pytest

from conftest import REPO, train_env

pytestmark = pytest.mark.unit

PROBE = """
import sys
from sparsepo.engine.policy import import_muon_eagerly
{call}
import deepspeed.runtime.zero.muon.muon_optimizer as m
from deepspeed.runtime import compiler
print(int("torch._inductor" in sys.modules), int(compiler.compile() is __import__("torch").compile),
      int(callable(m.MuonWithAuxAdam)))
"""


@pytest.mark.parametrize("call", [True, False])
def test_deepspeeds_muon_module_is_imported_without_torch_compile(call):
    code = PROBE.format(call="import_muon_eagerly()" if call else "")
    out = subprocess.run([sys.executable, "-c", code], env=train_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    inductor, compile_restored, muon = map(int, out.stdout.split()[-3:])
    assert compile_restored == 1 and muon == 1
    assert inductor == (0 if call else 1)  # without it the import pulls in torch._inductor (the control)
