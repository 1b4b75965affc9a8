"""benchmarks/gpu_report.py: model FLOPs, MFU and the rows of docs/gpu_bench.json, by hand."""

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_report as rep  # noqa: E402
from gpu_bench import live_layout, stage_file_for  # noqa: E402

pytestmark = pytest.mark.unit


def test_step_flops_by_hand():
    """N = 1000 parameters of which a 10 x 4 input embedding (untied: a lookup) -> 960 matmul
    parameters; L=2, h=4, s=8, 16 tokens: 16 * (6*960 + 12*2*4*8) = 16 * (5760 + 768) = 104,448;
    with the reference's forward: + 16 * (2*960 + 4*2*4*8) = + 16 * (1920 + 256) = + 34,816."""
    kw = dict(n_params=1000, vocab=10, hidden=4, layers=2, seq=8, tokens=16)
    assert rep.step_flops(**kw) == 104_448
    assert rep.step_flops(**kw, reference_forward=True) == 104_448 + 34_816
    assert rep.step_flops(**kw, tied=True) == 16 * (6 * 1000 + 768)  # a tied head multiplies: all parameters count


def test_issue19_workload_at_the_issue_speed_is_its_mfu():
    """The issue's figure: 0.94 B Llama (hidden 2048, 16 layers, vocab 32000, untied), 8,192 tokens of
    length 512, 0.320 s/step on a ~790 TFLOP/s H200 -> ~17% (it says "≈ 17%")."""
    n = 2 * 32000 * 2048 + 16 * (4 * 2048 * 2048 + 3 * 2048 * 5504) + 33 * 2048  # embed, head, layers, norms
    flops = rep.step_flops(n_params=n, vocab=32000, hidden=2048, layers=16, seq=512, tokens=8192)
    assert rep.mfu(flops, 0.320, 790e12) == pytest.approx(0.17, abs=0.01)
    with pytest.raises(ValueError):
        rep.mfu(flops, 0.0, 790e12)


def test_rows_median_after_warmup_and_ratios():
    times = [9.0, 9.0, 0.30, 0.20, 0.25]  # two warm-up steps, then median 0.25
    r = rep.row(system="sparsepo", mode="cache", times=times, skip=2, tokens=1000, peak_alloc_gib=26.04,
                flops=1e12, peak_flops=1e13)
    assert r["step_s"] == 0.25 and r["tokens_per_s"] == 4000.0 and r["mfu"] == 0.4 and r["peak_alloc_gib"] == 26.04
    t = rep.row(system="trl", mode="precompute", times=[1.0, 0.3], skip=1, tokens=1000, peak_alloc_gib=None,
                flops=1e12, peak_flops=None)
    assert t["mfu"] is None and t["step_s"] == 0.3
    assert rep.ratios([r, t]) == {"cache_vs_trl_precompute": 1.2}


def test_write_replaces_the_table_between_markers(tmp_path):
    res = {"date": "d", "device": "1x H200", "torch": "2.11", "deepspeed": "0.19.8", "trl": None, "peak_tflops": 790,
           "peak_dtype": "bfloat16", "n_params": 10, "command": "c",
           "workload": {"hidden": 4, "layers": 2, "vocab": 10, "batch": 8, "prompt": 128, "response": 384, "steps": 30,
                        "skip": 5},
           "rows": [{"system": "sparsepo", "mode": "cache", "step_s": 0.2, "tokens_per_s": 40960.0,
                     "peak_alloc_gib": 24.0, "mfu": 0.41}], "ratios": {}}
    md = tmp_path / "b.md"
    md.write_text("# Benchmarks\n\nkept\n")
    rep.write(res, tmp_path / "g.json", md)
    rep.write({**res, "rows": [{**res["rows"][0], "step_s": 0.1}]}, tmp_path / "g.json", md)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count(rep.BEGIN) == 1
    assert "| sparsepo | cache | 0.100 | 40,960 | 24.0 | 41.0% |" in text and "0.200" not in text
    assert "8192 tokens" in text and json.loads((tmp_path / "g.json").read_text())["rows"][0]["step_s"] == 0.1


def test_stage_file_and_live_layout_per_gpu_count():
    assert stage_file_for(1) == "one_gpu.json" and stage_file_for(4) == "zero3.json"
    assert live_layout(1) == (2, ["topology.reference_ranks=1", "topology.device_map=0,0"])
    assert live_layout(4) == (4, ["topology.reference_ranks=1"])
