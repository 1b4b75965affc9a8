"""Issue 25, item 7: refusals that name the right key, suggest a fix that exists, and exit 2."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from sparsepo.config import ConfigError, check_batch_size, load_config

ONE_RANK = SimpleNamespace(is_main=True, world_size=1, rank=0)


@pytest.mark.unit
def test_a_batch_size_mismatch_suggests_a_whole_grad_accum_or_a_divisible_batch():
    with pytest.raises(ConfigError) as e:
        check_batch_size(load_config(None, ["train.micro_batch_size=8", "train.train_batch_size=12"]), 1)
    assert "1.5" not in str(e.value) and "(e.g. 16)" in str(e.value), e.value
    with pytest.raises(ConfigError, match=r"or train.grad_accum=3\.$"):
        check_batch_size(load_config(None, ["train.micro_batch_size=4", "train.train_batch_size=12"]), 1)


@pytest.mark.unit
def test_staleness_of_the_whole_run_is_refused():
    base = ["method.name=spo", "reference.mode=inline", "train.max_steps=3"]
    load_config(None, [*base, "generation.staleness=2"])
    with pytest.raises(ConfigError, match=r"generation.staleness=3 in command-line override .* < train.max_steps=3"):
        load_config(None, [*base, "generation.staleness=3"])


@pytest.mark.unit
def test_demo_typo_is_refused_before_building_anything(tmp_path, capsys):
    from sparsepo.cli import main

    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["demo", "prepar", "--workdir", str(tmp_path / "demo")])
    assert e.value.code == 2 and time.perf_counter() - t0 < 5 and not (tmp_path / "demo").exists()
    assert "unknown action 'prepar' (did you mean 'prepare'?)" in capsys.readouterr().err


@pytest.mark.unit
def test_a_bad_prompts_path_is_named_as_generation_prompts_path(tmp_path):
    from sparsepo.data import DataError
    from sparsepo.rundata import load_run_prompts

    cfg = load_config(None, ["method.name=spo", "reference.mode=inline",
                             f"generation.prompts_path={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(DataError) as e:
        load_run_prompts(cfg, ONE_RANK, tokenizer=None)
    assert "generation.prompts_path" in str(e.value) and "data.path" not in str(e.value), e.value


@pytest.mark.unit
@pytest.mark.parametrize("manifest, expect", [
    (None, "no oracle.json there"),
    ({"oracle": "gone", "reference": "gone2"}, "which is no model directory"),
])
def test_sepo_oracle_problems_are_config_errors_in_preflight(tmp_path, manifest, expect):
    from sparsepo.losses import get_method
    from sparsepo.preflight import preflight

    if manifest is not None:
        (tmp_path / "oracle.json").write_text(json.dumps(manifest))
    cfg = load_config(None, ["method.name=sepo", f"reference.oracle={tmp_path}"])
    with pytest.raises(ConfigError, match=f"reference.oracle: .*{expect}"):
        preflight(cfg, get_method("sepo"), ONE_RANK)


def test_a_config_error_found_after_the_launch_exits_2(tiny_world, tmp_path):
    from conftest import run_training

    proc = run_training(tiny_world, tmp_path, "train.micro_batch_size=8", "train.train_batch_size=12", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: train.train_batch_size=12" in proc.stderr and not (tmp_path / "final").exists()


@pytest.mark.unit
def test_the_first_error_line_of_a_live_failure_names_the_lost_peer(monkeypatch, caplog):
    from sparsepo import train as entry

    lost = ("lost policy rank 0 (global rank 0), which hosts the bridge store (DistStoreError: ...): stopped, "
            "hung or dead")
    monkeypatch.setattr(entry, "_peer_cause", lambda: (1, lost, 0))
    with caplog.at_level("ERROR", logger="sparsepo"):
        code, message, blame = entry.report_failure(RuntimeError("[gloo] Connection closed by peer [10.0.0.2]:4711"))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0] == lost and "Connection closed by peer" in errors[1], errors
    assert (code, blame) == (1, 0) and "Connection closed" in message
    monkeypatch.setattr(entry, "_peer_cause", lambda: None)  # no peer to blame: the local error first
    caplog.clear()
    with caplog.at_level("ERROR", logger="sparsepo"):
        assert entry.report_failure(ValueError("bad row"))[::2] == (1, None)
    assert caplog.records[0].getMessage() == "ValueError: bad row"
