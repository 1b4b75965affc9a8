"""benchmarks/bench_sepo.py: run labels, and a smoke run on the tiny world (1 seed, 2 steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, train_env

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_sepo  # noqa: E402


@pytest.mark.unit
def test_specs_sweep_rho_on_the_small_oracle_and_one_policy_size_run():
    a = SimpleNamespace(rhos="0.1,1.0", policy_oracle_rho="0.3", baselines=True)
    specs = bench_sepo.parse_specs(a)
    assert list(specs) == ["sepo[rho0.1]", "sepo[rho1.0]", "sepo[rho0.3-policy]", "dpo β=0.1", "simpo"]
    assert specs["sepo[rho1.0]"] == ("sepo", ["method.rho=1.0"], {"oracle": "small", "rho": 1.0})
    assert specs["sepo[rho0.3-policy]"][2]["oracle"] == "policy"
    assert specs["dpo β=0.1"] == ("dpo", ["method.beta=0.1"], {})
    assert bench_sepo.pretty("sepo[rho0.3-policy]", specs["sepo[rho0.3-policy]"][2]) == \
        "SePO ρ=0.3, policy-size oracle"
    a = SimpleNamespace(rhos="0.5", policy_oracle_rho="", baselines=False)
    assert list(bench_sepo.parse_specs(a)) == ["sepo[rho0.5]"]


@pytest.mark.unit
def test_step_summary_ratio_per_round_and_pooled():
    steps = [{"label": "simpo", "cpu_ms_per_step": 100.0, "wall_step_median_ms": 200.0},
             {"label": "sepo[rho0.3]", "cpu_ms_per_step": 102.0, "wall_step_median_ms": 210.0},
             {"label": "sepo[rho0.3]", "cpu_ms_per_step": 110.0, "wall_step_median_ms": 230.0},
             {"label": "simpo", "cpu_ms_per_step": 100.0, "wall_step_median_ms": 220.0}]
    s = bench_sepo.step_summary(steps, "sepo[rho0.3]")
    assert s["ratio_per_round"] == pytest.approx([1.02, 1.10])
    assert s["ratio_pooled"] == pytest.approx(1.06) and not s["target_met"]
    assert s["wall_ratio"] == pytest.approx(220.0 / 210.0)


@pytest.mark.integration
@pytest.mark.slow
def test_bench_sepo_smoke_writes_its_files(tiny_world, tmp_path):
    out_json, doc = tmp_path / "sepo.json", tmp_path / "sepo.md"
    doc.write_text("# kept\n\nother text\n")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_sepo.py"), "--size", "tiny", "--world",
           str(tiny_world.root), "--workdir", str(tmp_path / "work"), "--extensions-dir", "", "--steps", "2",
           "--short-steps", "1", "--step-steps", "2", "--step-repeats", "1", "--seeds", "0", "--rhos", "0.3,1.0",
           "--oracle-steps", "2",
           "--json", str(out_json), "--doc", str(doc)]
    env = dict(train_env(), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out_json.read_text())
    assert list(res["methods"]) == ["sepo[rho0.3]", "sepo[rho1.0]", "sepo[rho0.3-policy]", "dpo β=0.1", "simpo"]
    assert len(res["runs"]) == 5 and {r["seed"] for r in res["runs"]} == {0}
    for s in res["methods"].values():
        assert 0.0 <= s["win_rate"] <= 1.0 and 0.0 <= s["policy_ended_fraction"] <= 1.0
    assert set(res["oracles"]) == set(res["reference"]) == {"small", "policy"}
    assert res["oracles"]["small"]["n_params"] * 4 <= res["oracles"]["policy"]["n_params"]
    for r in res["reference"].values():
        assert r["cache_pairs"] > 0 and r["cache_bytes_per_pair"] > 0 and r["scoring"]["cpu_ms_per_pair"] > 0
    # SePO (ρ=0.3, small oracle) against SimPO: one round of long and short runs
    assert [x["label"] for x in res["step_runs"]] == ["simpo", "sepo[rho0.3]"]
    assert "ratio_pooled" in res["step"] and len(res["step"]["ratio_per_round"]) == 1
    assert res["bridge"]["selection"]["bytes_per_pair"] * 8 < res["bridge"]["float32_scores"]["bytes_per_pair"]
    text = doc.read_text()
    assert text.startswith("# kept\n\nother text\n")
    assert bench_sepo.BEGIN in text and bench_sepo.END in text and "| SePO ρ=1, small oracle | 1 |" in text
