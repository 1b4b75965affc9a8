"""Every benchmark script runs on a tiny setting and writes the files it promises (figures are not
checked against targets here: speed and memory live in the benchmarks, not in timed tests).
bench_quality has its own smoke test (tests/test_bench_quality.py). bench_trl is not run here: it needs
TRL, an optional extra (`pip install .[bench]`) that is never a test dependency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_env

BENCH = REPO / "benchmarks"


def run_bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(train_env(), PYTHONPATH=f"{REPO}:{BENCH}")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_bench_overlap_writes_ratio_and_hidden_fraction(tiny_world, tmp_path):
    out = tmp_path / "overlap.md"
    run_bench("bench_overlap.py", "--size", "tiny", "--world", str(tiny_world.root), "--workdir", str(tmp_path / "w"),
              "--steps", "5", "--repeats", "1", "--micro", "2", "--out", str(out))
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res["median"]) == {"cache", "inline", "live"}
    assert all(len(v) == 1 and v[0]["step_time_s"] > 0 for v in res["runs"].values())
    assert res["median"]["inline"]["ref_wait_s"] > 0  # inline's wait is the reference forward itself
    assert res["hidden_fraction"] <= 1.0 and res["live_over_cache"] > 0
    assert "live ÷ cache" in out.read_text()


@pytest.mark.slow
def test_bench_train_writes_one_and_two_process_rows(tiny_world, tmp_path):
    out = tmp_path / "train.md"
    run_bench("bench_train.py", "--size", "tiny", "--world", str(tiny_world.root), "--steps", "5",
              "--global-batch", "4", "--out", str(out))
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res["runs"]) == {"1", "2"}
    assert all(r["step_time_s"] > 0 and len(r["peak_rss_mib_per_rank"]) == int(n) for n, r in res["runs"].items())


@pytest.mark.slow
def test_bench_methods_writes_doc_and_json(tiny_world, tmp_path):
    doc = tmp_path / "methods.md"
    run_bench("bench_methods.py", "--size", "tiny", "--world", str(tiny_world.root), "--workdir", str(tmp_path / "w"),
              "--steps", "4", "--short-steps", "2", "--micro-batch", "2", "--methods", "fpo,simpo",
              "--sae-steps", "20", "--overhead-reps", "2", "--eval-samples", "1", "--doc", str(doc), timeout=900)
    text = doc.read_text()
    assert "<!-- bench_methods:begin -->" in text and "| simpo |" in text and "| fpo |" in text
    res = json.loads(doc.with_suffix(".json").read_text())
    assert {"fpo", "simpo"} <= set(res["methods"]) and res["fpo"]["cache_bytes_per_pair"] > 0


@pytest.mark.integration
def test_bench_logprobs_measures_plain_and_chunked(tmp_path):
    out = tmp_path / "lp.json"
    run_bench("bench_logprobs.py", "--vocab", "512", "--seq-len", "64", "--also-seq-lens", "", "--hidden", "16",
              "--steps", "1", "--chunks", "0,16", "--json", str(out))
    res = json.loads(out.read_text())
    assert [(r["seq_len"], r["chunk"]) for r in res["results"]] == [(64, 0), (64, 16)]
    assert all(r["peak_rss_mb"] > 0 for r in res["results"])


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_bench_spo_kl_writes_estimator_errors(tmp_path):
    out = tmp_path / "kl.json"
    run_bench("bench_spo_kl.py", "--n", "64", "--vocab", "20", "--out", str(out))
    res = json.loads(out.read_text())
    # at K = V the top-K + tail estimator is the dense KL: no shortfall
    assert res["topk_tail"]["20"]["policy"] == pytest.approx(0.0, abs=1e-12)
    assert res["topk_tail"]["1"]["reference_only"] > res["topk_tail"]["1"]["policy"] > 0


@pytest.mark.unit
def test_scaling_model_by_hand(tmp_path):
    sys.path.insert(0, str(BENCH))
    import scaling

    # 70B in bf16 with 25% headroom = 175 GB -> 3 stages of 80 GB; 1B -> 1 stage
    assert scaling.stages_for(70e9) == 3 and scaling.stages_for(1e9) == 1
    # 64 policy GPUs, reference = policy: 64 * (2/6 * 0.4/0.5) / 1.10 = 15.5 -> 16
    assert scaling.reference_gpus(64, 8e9, 8e9) == (16, 1)
    # 70B: 64 * 0.2667 * (1 + 2/8) / 1.10 = 19.4 -> whole pipelines of 3 -> 21
    assert scaling.reference_gpus(64, 70e9, 70e9) == (21, 3)
    # a measured share replaces the FLOP ratio: 64 * 0.11 / 1.10 = 6.4 -> 7
    assert scaling.reference_gpus(64, 8e9, 8e9, share=0.11) == (7, 1)
    text = scaling.main(["--overlap", str(tmp_path / "none.json"), "--methods", str(tmp_path / "none.json"),
                         "--out", str(tmp_path / "scaling.md")])
    assert "| 70B, FLOP model | 3 | 21 (33%, 3 nodes)" in text


@pytest.mark.unit
def test_bench_methods_names_any_rows_reference_side():
    sys.path.insert(0, str(BENCH))
    import methods_report

    assert methods_report.reference_side("hinge") == "cache: seq_logps"  # a TRL-family row: sequence log-probs
    assert methods_report.reference_side("orpo") == "none"  # reference-free
    assert methods_report.reference_side("fpo").startswith("offline cache")


@pytest.mark.slow
def test_bench_tr_dpo_live_times_the_sync_and_the_step_after(tiny_world, tmp_path):
    out = tmp_path / "trdpo.json"
    run_bench("bench_tr_dpo_live.py", "--world", str(tiny_world.root), "--repeats", "1", "--steps", "3",
              "--vocab", "2000", "--out", str(out))
    table = json.loads(out.read_text())["table"]
    assert set(table) == {"live, frozen reference", "live, TR-DPO", "inline, TR-DPO"}
    assert table["live, TR-DPO"]["sync_s"] > 0 and table["inline, TR-DPO"]["sync_s"] > 0
    assert table["live, frozen reference"]["sync_s"] is None
