"""Refusals from the command line (`sparsepo.prelaunch`): `sparsepo train --nproc N` checks the
config — keys, stage file, live mode's model family and topology, the batch split — in the CLI
process and exits 2 without starting a launcher; each launched process repeats the check and exits
2 before any process group. Timing-free: the launcher is replaced by a recorder that must stay unused.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prelaunch.py
"""

from __future__ import annotations

import pytest

from sparsepo import cli

pytestmark = pytest.mark.unit

LIVE = ("reference.mode=live", "topology.reference_ranks=2", "topology.pipeline_stages=2", "method.name=dpo")


def model_dir(path, kind: str = "llama"):
    """A model directory with a config and tokenizer files only (no weights: nothing may load them)."""
    import transformers as T

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
    config = (T.LlamaConfig(**common) if kind == "llama" else
              T.Gemma3Config(text_config=dict(**common, head_dim=8)))  # multimodal: refused by live mode
    config.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def launcher(monkeypatch):
    """The launcher's subprocess: records the command instead of starting it."""
    started = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **k: started.append(cmd) or 0)
    return started


def sparsepo(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code


@pytest.mark.parametrize("argv,says", [
    (("method.bta=0.1",), "unknown key 'method.bta'"),
    (("deepspeed.stage_file=zero9.json",), "zero9.json"),
    (("train.train_batch_size=5",), "train.train_batch_size=5"),
    ((*LIVE, "topology.reference_ranks=4", "topology.pipeline_stages=1"), "leaves no policy ranks"),
    ((*LIVE, "topology.reference_ranks=5", "topology.pipeline_stages=5"), "pipeline_stages=5 > num_layers=4"),
    ((*LIVE, "method.name=fpo"), "sae.path"),
], ids=["key", "stage-file", "batch-split", "topology", "stages", "live-method"])
def test_config_errors_exit_2_before_any_launcher(argv, says, tmp_path, launcher, capsys):
    model = model_dir(tmp_path / "m")
    assert sparsepo("train", "--nproc", "6" if "topology.pipeline_stages=5" in argv else "4", f"model.path={model}",
                    *argv) == 2
    err = capsys.readouterr().err
    assert says in err and "config error" in err, err
    assert launcher == []


def test_a_family_live_mode_cannot_split_is_refused_before_any_launcher(tmp_path, launcher, capsys):
    model = model_dir(tmp_path / "m", "gemma3")
    assert sparsepo("train", "--nproc", "3", f"model.path={model}", *LIVE) == 2
    err = capsys.readouterr().err
    assert "model family 'gemma3'" in err and "reference.mode=cache" in err, err
    assert launcher == []
    assert sparsepo("train", "--nproc", "1", f"model.path={model}", "method.name=dpo") == 0  # cache mode serves it
    assert len(launcher) == 1


def test_a_sound_config_launches_with_its_process_count(tmp_path, launcher):
    model = model_dir(tmp_path / "m")
    assert sparsepo("train", "--nproc", "3", f"model.path={model}", *LIVE) == 0
    assert len(launcher) == 1 and launcher[0][launcher[0].index("--num_gpus") + 1] == "3"
    assert sparsepo("precompute", "--nproc", "2", f"model.path={model}") == 0
    assert len(launcher) == 2 and "reference.mode=precompute" in launcher[1]


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2"},
                                 {"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "1",
                                  "OMPI_COMM_WORLD_LOCAL_RANK": "1"}], ids=["deepspeed", "mpirun"])
def test_each_launched_process_exits_2_before_any_process_group(env, tmp_path, monkeypatch, capsys):
    """`python -m sparsepo.train` as every launcher starts it: the same check, with the launch's
    world size (3 processes: 2 reference ranks leave 1 policy rank, which cannot hold 4 x 1 x 1 = 2 x ...)."""
    import sparsepo.engine.dist as dist
    from sparsepo import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SPARSEPO_GLOBAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "init_distributed", lambda *a, **k: pytest.fail("a process group was started"))
    model = model_dir(tmp_path / "m", "gemma3")
    with pytest.raises(SystemExit) as e:
        train.main([f"model.path={model}", *LIVE])
    assert e.value.code == 2 and "model family 'gemma3'" in capsys.readouterr().err
    model = model_dir(tmp_path / "ok")
    with pytest.raises(SystemExit) as e:  # 3 processes, 2 of them the reference group: one policy rank
        train.main([f"model.path={model}", *LIVE, "train.train_batch_size=16", "train.micro_batch_size=8"])
    assert e.value.code == 2 and "x 1 policy ranks = 8" in capsys.readouterr().err
