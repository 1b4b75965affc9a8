"""`sparsepo export` without training: a tiny Llama directory, faked checkpoints whose sparsepo.json
is written as `checkpoint.save` writes it, and the zero-to-fp32 consolidation replaced by a stub that
returns known weights (the real consolidation is covered end to end in test_checkpoint.py)."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sparsepo import cli
from sparsepo.checkpoint import META
from sparsepo.export import export_checkpoint

pytestmark = pytest.mark.unit
SHARD = "mp_rank_00_model_states.pt"


def tiny_model_dir(path: Path):
    """A 1-layer Llama with a WordLevel tokenizer, saved with save_pretrained."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", "hi", "there"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def fake_checkpoint(tag_dir: Path, step: int, config: dict) -> Path:
    tag_dir.mkdir(parents=True)
    (tag_dir / SHARD).write_bytes(bytes(range(256)) * step)
    files = {SHARD: (tag_dir / SHARD).stat().st_size}
    meta = {"step": step, "samples": 4 * step, "world_size": 1, "data": "d" * 64, "config": config, "files": files,
            "sha256": {SHARD: hashlib.sha256((tag_dir / SHARD).read_bytes()).hexdigest()}}
    (tag_dir / META).write_text(json.dumps(meta))
    return tag_dir


@pytest.fixture
def project(tmp_path, monkeypatch):
    """proj/models/m (the model), proj/runs/r (a run started in proj with relative paths), trained
    weights = the model's own plus 1 (stubbed consolidation: which checkpoint was asked for is recorded)."""
    proj = tmp_path / "proj"
    model = tiny_model_dir(proj / "models" / "m")
    trained = {k: v + 1.0 for k, v in model.state_dict().items()}
    asked = []
    stub = types.ModuleType("sparsepo.engine.policy")
    stub.fp32_state_dict_from_checkpoint = lambda root, tag: asked.append(tag) or dict(trained)
    monkeypatch.setitem(sys.modules, "sparsepo.engine.policy", stub)
    config = {"model": {"path": "models/m", "tokenizer": None}, "logging": {"output_dir": "runs/r"},
              "method": {"name": "dpo"}}
    for step in (2, 4):
        fake_checkpoint(proj / "runs" / "r" / "checkpoints" / f"step-{step:08d}", step, config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return types.SimpleNamespace(root=proj, run=proj / "runs" / "r", trained=trained, asked=asked)


def test_export_from_another_working_directory_finds_the_relative_model_path(project, tmp_path):
    """The checkpoint records model.path=models/m relative to proj; exporting from elsewhere used to
    fail in transformers (a hub id lookup of 'models/m')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = export_checkpoint(project.run, tmp_path / "hf")
    assert (done.step, done.skipped, project.asked) == (4, [], ["step-00000004"])
    assert done.source_model == str(project.root / "models" / "m")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(got[k], v) for k, v in project.trained.items())
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("hi there")["input_ids"] == [4, 5]


def test_missing_model_names_both_places_looked(project, tmp_path):
    from sparsepo.checkpoint import CheckpointError

    (project.root / "models" / "m").rename(project.root / "models" / "gone")
    with pytest.raises(CheckpointError) as e:
        export_checkpoint(project.run, tmp_path / "hf")
    assert "model.path='models/m'" in str(e.value) and f"working directory {project.root}" in str(e.value)


def test_cli_says_which_step_was_exported_when_the_newest_is_damaged(project, tmp_path, capsys):
    shard = project.run / "checkpoints" / "step-00000004" / SHARD
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(project.run), str(tmp_path / "hf")])
    assert e.value.code == 0
    reason = f"{SHARD} does not match its recorded sha256 (corrupted or modified)"
    assert capsys.readouterr().out.startswith(f"exported step 2 (newest valid; step 4 was skipped: {reason}): ")
    record = json.loads((tmp_path / "hf" / "sparsepo_export.json").read_text())
    assert (record["step"], record["skipped_newer"]) == (2, [{"step": 4, "reason": reason}])
    assert project.asked == ["step-00000002"]


def test_cli_names_the_step_of_an_explicit_checkpoint(project, tmp_path, capsys):
    tag = project.run / "checkpoints" / "step-00000002"
    with pytest.raises(SystemExit):
        cli.main(["export", str(tag), str(tmp_path / "hf")])
    assert capsys.readouterr().out.startswith(f"exported step 2: {tag} -> ")


@pytest.mark.parametrize("fp32_master", [False, True], ids=["default", "fp32-master"])
def test_a_bf16_run_exports_bf16_weights_unless_the_master_is_asked_for(project, tmp_path, fp32_master, capsys):
    """The checkpoint of a bf16 run (train.precision in its sparsepo.json): by default the master
    weights rounded to bfloat16 (what the run's final/ holds), with --fp32-master the fp32 master."""
    from transformers import AutoModelForCausalLM

    tag = project.run / "checkpoints" / "step-00000004"
    meta = json.loads((tag / META).read_text())
    meta["config"]["train"] = {"precision": "bf16"}
    (tag / META).write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(tag), str(tmp_path / "hf"), *(["--fp32-master"] if fp32_master else [])])
    assert e.value.code == 0
    dtype = torch.float32 if fp32_master else torch.bfloat16
    assert ("bfloat16 weights" in capsys.readouterr().out) != fp32_master
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto").state_dict()
    assert all(got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)) for k, v in project.trained.items())
    assert json.loads((tmp_path / "hf" / "sparsepo_export.json").read_text())["dtype"] == str(dtype).split(".")[1]
