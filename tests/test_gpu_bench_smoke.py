"""benchmarks/gpu_bench.sh end to end on CPU (GPU_BENCH_ALLOW_CPU=1) on the tiny workload: cache,
inline and live rows in the JSON schema of docs/gpu_bench.json, no checkpoint written. The GPU
figures themselves need a GPU (issue 19)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_gpu_bench_script_logic_on_cpu(tmp_path):
    env = dict(os.environ, SPARSEPO_PYTHON=sys.executable, GPU_BENCH_ALLOW_CPU="1", PRESET="tiny", OUT=str(tmp_path), JSON=str(tmp_path / "g.json"),
               MD=str(tmp_path / "b.md"), MODES="cache,inline,live,lora,qlora", TRL_PYTHON="none",
               PATH=f"/nonexistent-nvidia:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_bench.sh")], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "g.json").read_text())
    assert {"device", "torch", "deepspeed", "trl", "workload", "rows"} <= set(res)
    assert [(r["system"], r["mode"]) for r in res["rows"]] == [("sparsepo", m) for m in
                                                               ("cache", "inline", "live", "lora", "qlora")]
    for r in res["rows"]:
        assert {"system", "mode", "step_s", "tokens_per_s", "peak_alloc_gib", "mfu"} <= set(r)
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(64 / r["step_s"], rel=1e-2) and 0 < r["mfu"] < 1
    assert "| sparsepo | live |" in (tmp_path / "b.md").read_text()
    assert not list(tmp_path.glob("*/checkpoints/step-*"))  # benchmarks write no checkpoint
