"""Config: YAML round-trip, dotted overrides, DeepSpeed JSON, and every refusal."""

import json

import pytest
import yaml

from sparsepo.config import (
    ConfigError,
    RunConfig,
    build_deepspeed_config,
    check_batch_size,
    config_fingerprint,
    load_config,
    lr_schedule,
    save_resolved,
    to_dict,
)


def write(tmp_path, body: dict, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def test_defaults_are_a_valid_run():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "dpo" and cfg.method.params.beta == 0.1


def test_yaml_sections_and_method_params(tmp_path):
    path = write(tmp_path, {"method": {"name": "simpo", "beta": 2.5, "gamma": 0.3},
                            "optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "train": {"micro_batch_size": 2}})
    cfg = load_config(path)
    assert cfg.method.name == "simpo"
    assert (cfg.method.params.beta, cfg.method.params.gamma) == (2.5, 0.3)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.lr == 1e-4
    assert cfg.train.micro_batch_size == 2


def test_overrides_win_over_file_and_parse_types(tmp_path):
    path = write(tmp_path, {"method": {"name": "dpo", "beta": 0.1}})
    cfg = load_config(path, ["method.beta=0.05", "train.max_steps=7", "logging.tensorboard=false",
                             "model.tokenizer=null", "optim.lr=3"])
    assert cfg.method.params.beta == 0.05
    assert cfg.train.max_steps == 7
    assert cfg.logging.tensorboard is False
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)  # ints accepted for floats


def test_round_trip_through_resolved_file(tmp_path):
    cfg = load_config(None, ["method.name=tdpo2", "method.alpha=0.3", "train.seed=5"])
    path = save_resolved(cfg, tmp_path / "run")
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert config_fingerprint(again) == config_fingerprint(cfg)
    assert config_fingerprint(load_config(None, ["train.seed=6"])) != config_fingerprint(cfg)


@pytest.mark.parametrize("body,override,needles", [
    ({"optim": {"lrr": 1e-4}}, [], ["unknown key 'optim.lrr'", "run.yaml", "Did you mean 'lr'"]),
    ({"optimiser": {"lr": 1e-4}}, [], ["unknown section 'optimiser'", "Did you mean 'optim'"]),
    ({}, ["method.bta=0.2"], ["unknown key 'method.bta'", "command-line override 'method.bta=0.2'",
                              "Did you mean 'beta'"]),
    ({"method": {"name": "dop"}}, [], ["unknown method 'dop'", "Did you mean 'dpo'"]),
    ({"train": {"micro_batch_size": "four"}}, [], ["'train.micro_batch_size'", "must be int", "run.yaml"]),
    ({"train": {"micro_batch_size": 2.5}}, [], ["must be int"]),
    ({"logging": {"tensorboard": "yes"}}, [], ["'logging.tensorboard'", "must be bool"]),
    ({"optim": {"betas": [0.9]}}, [], ["'optim.betas'", "list of 2"]),
    ({"reference": {"mode": "lvie"}}, [], ["'reference.mode'", "choose one of", "Did you mean 'live'"]),
    ({"train": {"precision": "fp8"}}, [], ["'train.precision'", "fp32, bf16, fp16"]),
    ({"method": {"name": "dpo", "beta": -1.0}}, [], ["method", "beta"]),
    ({"data": {"max_length": 64, "max_prompt_length": 64}}, [], ["max_prompt_length=64", "max_length=64"]),
    ({"reference": {"mode": "live"}}, [], ["reference.mode=live", "topology.reference_ranks"]),
    ({"topology": {"reference_ranks": 2}}, [], ["reference.mode=cache", "reference_ranks=2"]),
    ({"topology": {"reference_ranks": 2}, "reference": {"mode": "inline"}}, [], ["reference.mode=inline"]),
    ({"method": {"name": "fpo"}}, [], ["needs an SAE", "sae.path"]),
    ({"method": {"name": "spo"}}, [], ["method 'spo'", "samples the policy draws during training",
                                       "nothing can be precomputed", "reference.mode=cache", "set reference.mode=inline"]),
    ({"method": {"name": "spo"}, "reference": {"mode": "inline"}, "generation": {"top_p": 0.0}}, [],
     ["generation.top_p=0.0", "(0, 1]"]),
    ({"generation": {"params": "sharded"}}, [], ["'generation.params'", "gathered, synced"]),
    ({"method": {"name": "sepo"}}, [], ["method 'sepo'", "reference.oracle", "sparsepo sepo train-oracle"]),
    ({"train": {"micro_batch_size": 0}}, [], ["train.micro_batch_size=0", ">= 1"]),
    ({"train": "fast"}, [], ["section 'train'", "mapping"]),
])
def test_refusals_name_key_source_and_fix(tmp_path, body, override, needles):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_config(path, override)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["method.beta"])
    with pytest.raises(ConfigError, match="must be section.key"):
        load_config(None, ["beta=0.1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_batch_arithmetic_is_checked():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2", "train.train_batch_size=16"])
    assert check_batch_size(cfg, dp_size=2) == 16
    with pytest.raises(ConfigError) as e:
        check_batch_size(cfg, dp_size=3)
    assert "train.train_batch_size=16" in str(e.value) and "= 24" in str(e.value)


def test_deepspeed_json_from_stage_file_and_config():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=3", "optim.lr=1e-3",
                             "optim.warmup_steps=4", "train.precision=bf16", "optim.grad_clip=0.5"])
    ds = build_deepspeed_config(cfg, dp_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 12
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in ds  # the engine gets a transformers schedule (lr_schedule)
    assert lr_schedule(cfg, 50) == ("cosine_with_min_lr", {"num_warmup_steps": 4, "num_training_steps": 50,
                                                          "scheduler_specific_kwargs": {"min_lr_rate": 0.0}})
    assert lr_schedule(load_config(None, ["optim.schedule=constant"]), 9)[0] == "constant_with_warmup"
    assert "auto" not in json.dumps(ds)


def test_stage_file_with_auto_or_missing_is_refused(tmp_path):
    stage = tmp_path / "mine.json"
    stage.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    cfg = load_config(None, [f"deepspeed.stage_file={stage}"])
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(cfg, dp_size=1)
    assert "zero_optimization.reduce_bucket_size" in str(e.value) and "auto" in str(e.value)
    cfg = load_config(None, ["deepspeed.stage_file=zero9.json"])
    with pytest.raises(ConfigError, match="zero3.json"):
        build_deepspeed_config(cfg, dp_size=1)


def test_every_shipped_stage_file_builds():
    from sparsepo.config import DS_CONFIG_DIR

    files = sorted(DS_CONFIG_DIR.glob("*.json"))
    assert {f.name for f in files} >= {"zero3.json", "zero3_offload.json", "zero2.json"}
    for f in files:
        ds = build_deepspeed_config(load_config(None, [f"deepspeed.stage_file={f.name}"]), dp_size=1)
        assert ds["zero_optimization"]["stage"] in (2, 3)
    assert build_deepspeed_config(load_config(None, ["deepspeed.stage_file=one_gpu.json"]), dp_size=1)[
        "zero_optimization"]["overlap_comm"] is False


@pytest.mark.unit
@pytest.mark.parametrize("section, key, value, nearest", [("metod", "beta", 0.2, "method"),
                                                          ("foo", "bar", 1, None)])
def test_unknown_section_is_the_same_refusal_from_yaml_and_command_line(tmp_path, section, key, value, nearest):
    """An unknown section in an override used to crash with KeyError: 'metod'."""
    errors = {}
    for how, args in {"yaml": (write(tmp_path, {section: {key: value}}), []),
                      "override": (None, [f"{section}.{key}={value}"])}.items():
        with pytest.raises(ConfigError) as e:
            load_config(*args)
        errors[how] = str(e.value)
    where = {"yaml": str(tmp_path / "run.yaml"), "override": f"command-line override '{section}.{key}={value}'"}
    for how, msg in errors.items():
        hint = f" Did you mean '{nearest}'?" if nearest else ""
        assert msg.startswith(f"unknown section '{section}' in {where[how]}.{hint} Valid sections: "), msg
        assert msg.split(" Valid sections: ")[1] == errors["yaml"].split(" Valid sections: ")[1]


# ---------------------------------------------------------------------------- local inputs


def test_missing_model_path_is_refused_before_any_loader(tmp_path):
    from sparsepo.config.paths import check_local_inputs

    missing = tmp_path / "x" / "y"
    with pytest.raises(ConfigError) as e:
        check_local_inputs(load_config(None, [f"model.path={missing}"]))
    assert str(e.value) == (f"model.path {missing}: no such directory (sparsepo never downloads; point it at a "
                            f"local Hugging Face model directory)")


def test_model_dir_without_tokenizer_files_names_dir_and_files(tmp_path):
    from sparsepo.config.paths import TOKENIZER_FILES, check_local_inputs

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text("{}")  # not enough on its own
    with pytest.raises(ConfigError) as e:
        check_local_inputs(load_config(None, [f"model.path={model}"]))
    msg = str(e.value)
    assert msg.startswith(f"model.path {model}: no tokenizer files") and all(f in msg for f in TOKENIZER_FILES)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    check_local_inputs(load_config(None, [f"model.path={model}", f"model.tokenizer={tok}"]))  # accepted
    with pytest.raises(ConfigError, match=r"^reference\.path .*ref: no such directory"):
        check_local_inputs(load_config(None, [f"model.path={model}", f"model.tokenizer={tok}",
                                              f"reference.path={tmp_path / 'ref'}"]))


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_train_entry_point_refuses_a_missing_model_path_with_exit_2(tmp_path):
    """`python -m sparsepo.train model.path=/x/y` used to end in transformers' "Repo id must be in the
    form ..." from the tokenizer loader; it must stop at the config check, naming the key and path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "sparsepo.train", f"logging.output_dir={tmp_path / 'run'}",
                           "model.path=/x/y"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: model.path /x/y: no such directory (sparsepo never downloads" in proc.stderr
    assert "Repo id" not in proc.stderr and not (tmp_path / "run").exists()


def test_existing_local_paths_are_stored_absolute_and_a_resume_from_another_cwd_is_accepted(tmp_path, monkeypatch):
    """A run started in proj/ with model.path=models/m records /…/proj/models/m, so the resolved
    config.yaml works from anywhere, and the checkpoint comparison (which compares model.path as a
    string) accepts a resume from another working directory naming the same directory."""
    import hashlib

    from sparsepo.checkpoint import META, check_compatible

    proj, other = tmp_path / "proj", tmp_path / "other"
    for d in (proj / "models" / "m", proj / "tok", proj / "data", other):
        d.mkdir(parents=True)
    (proj / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(proj)
    first = load_config(None, ["model.path=models/m", "model.tokenizer=./tok/../tok", "data.path=data/train.jsonl",
                               "reference.path=not/there", "logging.output_dir=runs/r"])
    assert (first.model.path, first.model.tokenizer, first.data.path) == (
        str(proj / "models" / "m"), str(proj / "tok"), str(proj / "data" / "train.jsonl"))
    assert first.reference.path == "not/there" and first.logging.output_dir == "runs/r"  # left as written
    resolved = save_resolved(first, proj / "runs" / "r")

    monkeypatch.chdir(other)
    again = load_config(resolved, ["model.path=../proj/models/m"])  # another spelling, same directory
    assert to_dict(again)["model"] == to_dict(first)["model"]
    tag = proj / "runs" / "r" / "checkpoints" / "step-00000002"
    tag.mkdir(parents=True)
    (tag / "shard").write_bytes(b"x")
    (tag / META).write_text(json.dumps({"step": 2, "samples": 8, "world_size": 1, "data": "d", "config": to_dict(first),
                                        "files": {"shard": 1}, "sha256": {"shard": hashlib.sha256(b"x").hexdigest()}}))
    assert check_compatible(tag, again, data_fingerprint="d", world_size=1)["step"] == 2


def _checkpoint_with(tmp_path, config: dict):
    from sparsepo.checkpoint import META

    tag = tmp_path / "step-00000002"
    tag.mkdir()
    (tag / META).write_text(json.dumps({"step": 2, "samples": 8, "world_size": 1, "data": "d", "config": config}))
    return tag


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default(tmp_path):
    """A checkpoint written by an older sparsepo lacks the options added since (here DPO's ld_alpha and
    wpo_weighting); at their defaults (the old behaviour) the resume goes on, set otherwise it is
    refused naming the key. model.logits_chunk (lean vs plain path: the same numbers) may differ."""
    from sparsepo.checkpoint import CheckpointError, check_compatible

    cfg = load_config(None, ["method.name=dpo", "train.micro_batch_size=8", "train.grad_accum=1"])
    old = to_dict(cfg)
    del old["method"]["ld_alpha"], old["method"]["wpo_weighting"]
    old["model"]["logits_chunk"] = 0  # the previous default
    tag = _checkpoint_with(tmp_path, old)
    assert check_compatible(tag, cfg, data_fingerprint="d", world_size=1)["step"] == 2
    changed = load_config(None, ["method.name=dpo", "train.micro_batch_size=8", "train.grad_accum=1",
                                 "method.ld_alpha=0.5"])
    with pytest.raises(CheckpointError, match=r"method\.ld_alpha: None -> 0\.5"):
        check_compatible(tag, changed, data_fingerprint="d", world_size=1)
    beta = load_config(None, ["method.name=dpo", "train.micro_batch_size=8", "train.grad_accum=1", "method.beta=0.3"])
    with pytest.raises(CheckpointError, match=r"method\.beta"):  # a key both know still has to match
        check_compatible(tag, beta, data_fingerprint="d", world_size=1)
