"""benchmarks/bench_quality.py: distinct-n by hand, and a smoke run on the tiny world (1 seed, 2 steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_env

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_quality  # noqa: E402


@pytest.mark.unit
def test_distinct_n_counts_unique_word_ngrams():
    # bigrams: (a b) (b a) (a b) | (a b) -> 4 bigrams, 2 unique -> 0.5; a one-word text adds none
    assert bench_quality.distinct_n(["a b a b", "a b", "c"], 2) == pytest.approx(0.5)
    assert bench_quality.distinct_n(["a b c"], 1) == pytest.approx(1.0)
    assert bench_quality.distinct_n(["x"], 2) == 0.0


@pytest.mark.unit
def test_word_entropy_by_hand():
    # words a a b b -> p = (1/2, 1/2): ln 2; a a a b -> -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623; one word -> 0
    assert bench_quality.word_entropy(["a a", "b b"]) == pytest.approx(0.693147, abs=1e-6)
    assert bench_quality.word_entropy(["a a a b"]) == pytest.approx(0.562335, abs=1e-6)
    assert bench_quality.word_entropy(["x x", ""]) == 0.0 and bench_quality.word_entropy([]) == 0.0


@pytest.mark.unit
def test_spo_alpha_sweep_gives_one_row_per_alpha():
    import argparse

    a = argparse.Namespace(methods="dpo,spo", dpo_betas="0.1", spo_alphas="0.5,2")
    assert bench_quality.parse_specs(a) == {"dpo β=0.1": ("dpo", ["method.beta=0.1"]),
                                            "spo α=0.5": ("spo", ["method.alpha=0.5"]),
                                            "spo α=2": ("spo", ["method.alpha=2"])}
    a.spo_alphas = ""
    assert bench_quality.parse_specs(a)["spo"] == ("spo", [])


@pytest.mark.unit
def test_mean_se_is_stdev_over_sqrt_n():
    # values 1, 2, 3: mean 2, sample stdev 1, s.e. 1/sqrt(3)
    m, se = bench_quality.mean_se([1.0, 2.0, 3.0])
    assert (m, se) == pytest.approx((2.0, 3 ** -0.5))


@pytest.mark.integration
@pytest.mark.slow
def test_bench_quality_smoke_writes_its_files(tiny_world, tmp_path):
    out_json, doc = tmp_path / "q.json", tmp_path / "quality.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_quality.py"), "--size", "tiny", "--world",
           str(tiny_world.root), "--workdir", str(tmp_path / "work"), "--extensions-dir", "", "--steps", "2",
           "--seeds", "0", "--methods", "dpo,simpo,sepo,spo", "--dpo-betas", "0.1,0.3", "--json", str(out_json),
           "--doc", str(doc), "--plot", str(tmp_path / "frontier.png")]
    env = dict(train_env(), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out_json.read_text())
    assert list(res["methods"]) == ["dpo β=0.1", "dpo β=0.3", "simpo", "sepo", "spo"]
    assert len(res["runs"]) == 5 and {r["seed"] for r in res["runs"]} == {0}
    for s in res["methods"].values():
        assert s["n_seeds"] == 1
        assert 0.0 <= s["win_rate"] <= 1.0 and 0.0 <= s["policy_ended_fraction"] <= 1.0
        assert 0.0 < s["distinct2"] <= 1.0 and s["policy_length"] > 0 and s["word_entropy"] > 0
    text = doc.read_text()
    assert bench_quality.BEGIN in text and bench_quality.END in text
    assert "| dpo β=0.3 | 1 |" in text and "| spo | 1 |" in text
