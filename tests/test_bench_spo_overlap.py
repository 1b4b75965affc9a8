"""benchmarks/bench_spo_overlap.py: its figures by hand, and a smoke run on the tiny world (1 repeat, 4 steps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, train_env

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_spo_overlap  # noqa: E402
import common  # noqa: E402


@pytest.mark.unit
def test_figures_are_medians_then_ratios_to_inline():
    # inline steps 100/120/110 ms -> median 110, reference time 40; live steps 70/90/80 -> 80, wait 10/4/6 -> 6
    # ratio 80/110, hidden 1 - 6/40 = 0.85
    run = lambda step, wait: {"step_time_s": step, "ref_wait_s": wait, "gen_time_s": 1.0}  # noqa: E731
    med = bench_spo_overlap.figures({"inline": [run(0.100, 0.040), run(0.120, 0.050), run(0.110, 0.030)],
                                     "live s=1": [run(0.070, 0.010), run(0.090, 0.004), run(0.080, 0.006)]})
    assert med["inline"]["ratio_to_inline"] == 1.0 and med["inline"]["hidden_fraction"] is None
    assert med["live s=1"]["ratio_to_inline"] == pytest.approx(0.080 / 0.110)
    assert med["live s=1"]["hidden_fraction"] == pytest.approx(0.85)


@pytest.mark.unit
def test_live_runs_are_pinned_one_core_per_rank_and_inline_to_one_core(tmp_path):
    world = type("W", (), {"sft_dir": tmp_path / "sft", "train_path": tmp_path / "t.jsonl"})
    inline = common.command(world, tmp_path, ["reference.mode=inline"], nproc=1, pin=True)
    live = common.command(world, tmp_path, ["reference.mode=live"], nproc=2, pin=True)
    assert inline[:3] == ["taskset", "-c", "0"] and "sparsepo.train" in inline
    assert "--bind_cores_to_rank" in live and live[live.index("--num_gpus") + 1] == "2"
    assert "taskset" not in common.command(world, tmp_path, [], nproc=1, pin=False)


@pytest.mark.integration
@pytest.mark.slow
def test_bench_spo_overlap_smoke_writes_its_json(tiny_world, tmp_path):
    out = tmp_path / "o.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_spo_overlap.py"), "--size", "tiny", "--world",
           str(tiny_world.root), "--workdir", str(tmp_path / "work"), "--steps", "4", "--repeats", "1",
           "--staleness", "1", "--max-new-tokens", "8", "--micro", "4", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(train_env(), PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert list(res["medians"]) == ["inline", "live s=1"] and len(res["runs"]["live s=1"]) == 1
    assert res["runs"]["live s=1"][0]["staleness"] == 1.0 and res["runs"]["inline"][0]["staleness"] == 0.0
    inline = res["medians"]["inline"]
    assert inline["ref_wait_s"] > 0 and inline["step_time_s"] > inline["ref_wait_s"]
    assert "| live s=1 | 2 |" in proc.stdout
