"""CUDA-only checks (`pytest -m gpu`; skipped without a CUDA device): the choices of
sparsepo/config/device.py and sparsepo/launch/devices.py where they matter, on the tiny workload.

    python -m pytest -m gpu tests/test_gpu.py
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from workload import build, preset

    w = preset("tiny", steps=3)
    return w, build(w, tmp_path_factory.mktemp("work"))


def run(tmp_path, w, built, nproc, *overrides):
    from workload import sparsepo_overrides

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(GPU_BENCH_MEM=str(tmp_path / "mem"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "benchmarks" / "gpu_entry.py"), *sparsepo_overrides(w, built), f"logging.output_dir={tmp_path}",
           f"reference.cache_dir={tmp_path / 'cache'}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "mem").glob("rank*.json"))]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_gpu_stage_file_fused_adamw_and_half_precision(tmp_path, tiny, precision):
    w, built = tiny
    mem = run(tmp_path, w, built, 1, "reference.mode=inline", f"train.precision={precision}",
              "deepspeed.stage_file=one_gpu.json")
    ds = json.loads((tmp_path / "ds_config.json").read_text())
    assert ds["optimizer"]["params"]["fused"] is True and ds[precision]["enabled"] is True
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["loss"] == summary["final"]["loss"]  # finite, not NaN
    assert mem and mem[0]["max_allocated_mib"] > 0
    assert not (tmp_path / "checkpoints").exists()  # checkpoint.at_end=false


def test_live_policy_and_reference_share_gpu0_by_configuration(tmp_path, tiny):
    """Two processes, one GPU index: both land on cuda:0 through topology.device_map, each world NCCL."""
    w, built = tiny
    mem = run(tmp_path, w, built, 2, "reference.mode=live", "topology.reference_ranks=1", "topology.device_map=0,0")
    assert [m["local_rank"] for m in mem] == [0, 0] and all(m["max_allocated_mib"] > 0 for m in mem)


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_2_trains(tmp_path, tiny):
    w, built = tiny
    run(tmp_path, w, built, 1, "reference.mode=inline", "train.precision=bf16",
        "model.attn_implementation=flash_attention_2")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_policy_ranks_over_nccl_with_host_collectives(tmp_path, tiny):
    """Two policy ranks, ZeRO-3 over NCCL; the loop's CPU-tensor all-reduces (metrics, preemption flag)
    ride the gloo half of the "cpu:gloo,cuda:nccl" group (an NCCL-only group refuses CPU tensors)."""
    w, built = tiny
    mem = run(tmp_path, w, built, 2, "reference.mode=inline", "train.precision=bf16")
    assert sorted(m["local_rank"] for m in mem) == [0, 1]
