"""The `sparsepo` command, run in-process through `sparsepo.cli.main` (training launches are replaced
by a recorder: these tests check what would be launched, not training itself)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
import yaml

from sparsepo.demo.run import DEMO_LIVE
from sparsepo import cli
from sparsepo.train import parse_args

pytestmark = pytest.mark.unit


@pytest.fixture
def launched(monkeypatch):
    calls = []

    def record(config, overrides, *, nproc=1, resume=None):
        calls.append({"config": config, "overrides": list(overrides), "nproc": nproc, "resume": resume})
        return 0

    monkeypatch.setattr(cli, "launch_train", record)
    return calls


def run(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


@pytest.mark.parametrize("argv", [
    ["train", "--resume", "auto", "method.beta=0.1"],
    ["train", "method.beta=0.1", "--resume", "auto"],
    ["train", "--resume=auto", "--method.beta=0.1"],
])
def test_train_takes_overrides_before_or_after_options(launched, argv):
    assert run(argv) == 0
    assert launched == [{"config": None, "overrides": ["method.beta=0.1"], "nproc": 1, "resume": "auto"}]


def test_overrides_keep_command_line_order_around_options(launched):
    """A later override of the same key wins in load_config, so the order must survive the split
    between argparse's positional and its leftovers."""
    assert run(["train", "optim.lr=1e-4", "--nproc", "2", "optim.lr=2e-4", "--config", "x.yaml", "optim.lr=3e-4"]) == 0
    assert launched[0]["overrides"] == ["optim.lr=1e-4", "optim.lr=2e-4", "optim.lr=3e-4"]
    assert (launched[0]["nproc"], launched[0]["config"]) == (2, "x.yaml")


def test_precompute_and_sae_train_take_late_overrides(launched, monkeypatch):
    assert run(["precompute", "--nproc", "1", "data.max_length=64"]) == 0
    assert launched[0]["overrides"] == ["data.max_length=64", "reference.mode=precompute"]
    seen = {}
    monkeypatch.setattr(cli, "cmd_sae_train", lambda a: seen.update(vars(a)) or 0)  # bound in build_parser
    assert run(["sae", "train", "--steps", "50", "sae.layer=0", "--out", "o", "train.seed=1"]) == 0
    assert (seen["steps"], seen["out"], seen["overrides"]) == (50, "o", ["sae.layer=0", "train.seed=1"])


def test_unknown_option_is_still_refused_by_name(launched, capsys):
    assert run(["train", "--resume", "auto", "--bogus", "method.beta=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "section.key=value" in err
    assert launched == []


def test_override_on_a_command_without_overrides_is_refused(capsys):
    assert run(["export", "ckpt", "out", "method.beta=0.1"]) == 2
    assert "unrecognized arguments: method.beta=0.1" in capsys.readouterr().err


def test_python_m_sparsepo_train_takes_late_overrides():
    args = parse_args(["--config", "c.yaml", "--resume", "auto", "method.beta=0.1", "--local_rank=0", "train.seed=3"])
    assert (args.config, args.resume, args.local_rank) == ("c.yaml", "auto", 0)
    assert args.overrides == ["method.beta=0.1", "train.seed=3"]
    with pytest.raises(SystemExit) as e:
        parse_args(["--resume", "auto", "--nope"])
    assert e.value.code == 2


def _all_parsers(parser, path=("sparsepo",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, path + (name,))


def test_every_option_and_positional_has_a_help_line():
    missing = [" ".join(path) + " " + (a.option_strings or [a.dest])[0]
               for path, parser in _all_parsers(cli.build_parser()) for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert missing == []


def test_train_help_documents_config_and_overrides(capsys):
    assert run(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config CONFIG  YAML run config" in out
    assert "section.key=value" in " ".join(out.split()) and "anywhere on the command line" in " ".join(out.split())


def test_config_keys_lists_every_key_with_type_default_and_doc(capsys):
    from sparsepo.config import RunConfig
    from sparsepo.losses import METHODS

    assert run(["config", "keys"]) == 0
    out = capsys.readouterr().out
    for section in dataclasses.fields(RunConfig):
        assert f"\n{section.name}:" in "\n" + out
        for f in dataclasses.fields(typing.get_type_hints(RunConfig)[section.name]):
            if f.name != "params":
                assert f"  {section.name}.{f.name}: " in out, f"{section.name}.{f.name}"
    for name, spec in METHODS.items():
        assert f"with method.name={name}:" in out
    flat = " ".join(out.split())
    assert "model.tokenizer: str | None = None Tokenizer directory; defaults to `path`." in flat
    assert "data.on_bad_row: str = 'error' [error | skip] error: refuse the dataset at the first bad row" in flat
    assert "method.gamma: float | None = None γ: target reward margin" in flat  # simpo's, from its params class
    assert "optim.betas: tuple[float, float] = [0.9, 0.999]" in flat


def test_config_show_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys, launched):
    from sparsepo.config import load_config, to_dict

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "simpo", "beta": 2.5}, "train": {"max_steps": 7}}))
    assert run(["config", "show", "train.max_steps=9", "--config", str(path), "method.gamma=0.25"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(load_config(path, ["train.max_steps=9", "method.gamma=0.25"]))
    assert (shown["method"], shown["train"]["max_steps"]) == ({"name": "simpo", "beta": 2.5, "gamma": 0.25, "gamma_beta_ratio": None}, 9)
    assert launched == []


def test_config_show_refuses_a_bad_key_with_exit_2(capsys):
    assert run(["config", "show", "method.bta=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'method.bta'" in err and "Did you mean 'beta'?" in err


@pytest.fixture
def demo_launch(monkeypatch, tmp_path):
    """`sparsepo demo` with the world, the launch and the evaluation replaced by recorders."""
    import sparsepo.demo as demo

    world = argparse.Namespace(root=tmp_path / "world", sft_dir=tmp_path / "sft", train_path=tmp_path / "train.jsonl",
                               eval_prompts_path=tmp_path / "eval.jsonl")
    calls = []

    def record(config, overrides, *, nproc=1, resume=None):
        calls.append({"overrides": list(overrides), "nproc": nproc})
        method = next(o for o in overrides if o.startswith("method.name=")).split("=")[1]
        (tmp_path / "runs" / f"run-{method}").mkdir(parents=True, exist_ok=True)
        return 0

    monkeypatch.setattr(demo, "prepare_world", lambda *a, **k: world)
    monkeypatch.setattr(demo, "evaluate_policy", lambda *a, **k: {"win_rate": 0.5, "kl": 0.0, "policy_reward": 0.0,
        "reference_reward": 0.0, "policy_length": 1.0, "reference_length": 1.0, "policy_ended_fraction": 1.0,
        "reference_ended_fraction": 1.0, "n": 1, "max_new_tokens": 1})
    monkeypatch.setattr(cli, "launch_train", record)
    return lambda *argv: (run(["demo", "--workdir", str(tmp_path / "runs"), *argv]), calls[-1])[1]


def test_demo_spo_is_a_live_launch_with_its_reference_ranks_on_top(demo_launch):
    """SPO's demo: a live 2-stage reference group, one step stale, launched as nproc + 2 processes
    through the deepspeed launcher; what the user sets on the command line wins."""
    got = demo_launch("--method", "spo")
    assert got["nproc"] == 3
    for o in DEMO_LIVE:
        assert o in got["overrides"]
    assert "reference.mode=live" in got["overrides"] and "generation.staleness=1" in got["overrides"]
    cmd = cli.train_command("recipe.yaml", got["overrides"], nproc=got["nproc"])
    assert cmd[cmd.index("--num_gpus") + 1] == "3" and "deepspeed.launcher.runner" in cmd
    got = demo_launch("--method", "spo", "--nproc", "2", "topology.reference_ranks=1", "topology.pipeline_stages=1")
    assert got["nproc"] == 3 and got["overrides"].count("topology.reference_ranks=1") == 1
    assert "topology.reference_ranks=2" not in got["overrides"]


@pytest.mark.parametrize("argv, nproc", [(("--method", "spo", "reference.mode=inline"), 1),
                                         (("--method", "dpo"), 1), (("--method", "simpo", "--nproc", "2"), 2)])
def test_demo_inline_spo_and_other_methods_launch_no_reference_group(demo_launch, argv, nproc):
    got = demo_launch(*argv)
    assert got["nproc"] == nproc
    assert not any(o.startswith(("topology.", "generation.staleness")) for o in got["overrides"])
    assert "reference.mode=live" not in got["overrides"]
