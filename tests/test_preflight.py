"""Preflight: what can refuse a run does so before the expensive work. A missing DeepSpeed stage file
is refused before any reference-cache shard is written, by `sparsepo precompute` (which scored the
whole dataset first, before) and by training in cache mode."""

import pytest

from conftest import run_training

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["precompute", "cache"])
def test_missing_stage_file_is_refused_before_any_cache_shard(tiny_world, tmp_path, mode):
    proc = run_training(tiny_world, tmp_path, "method.name=dpo", f"reference.mode={mode}",
                        "deepspeed.stage_file=no-such-stage.json", nproc=1, check=False, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "deepspeed.stage_file 'no-such-stage.json' not found" in out, out[-3000:]
    assert not list(tmp_path.rglob("shard-*.pt")), sorted(tmp_path.rglob("*"))
    assert "missing: scoring" not in out
