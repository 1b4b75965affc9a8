"""`sparsepo eval` and the demo: the reward is named and may be the user's (a reward-model directory
or module:callable), conversational prompts go through the chat template, a missing directory is
reported as missing; the demo's SAE and SePO oracle are retrained when a run asks for other settings."""

import json
import sys

import pytest

from sparsepo import cli


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_eval_with_a_user_callable_and_conversational_prompts(tiny_world, tmp_path, monkeypatch, capsys):
    from sparsepo.demo import evaluate_policy
    from sparsepo.demo.user_reward import encode_prompts
    from transformers import AutoTokenizer

    (tmp_path / "my_reward.py").write_text("def chars(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    chat = [{"role": "user", "content": "Story about the old play:"}]
    prompts = write_prompts(tmp_path / "p.jsonl", ["Comments on the modern airport:", chat])
    out = evaluate_policy(tiny_world.sft_dir, tiny_world.sft_dir, prompts, reward="my_reward:chars",
                          max_new_tokens=6, progress=False, return_samples=True)
    assert out["reward"] == "my_reward:chars"
    assert [s["policy_reward"] for s in out["samples"]] == [float(len(s["policy"])) for s in out["samples"]]
    tok = AutoTokenizer.from_pretrained(tiny_world.sft_dir)
    templated = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert encode_prompts(tok, [chat]) == [tok(templated, add_special_tokens=False)["input_ids"]]
    assert out["samples"][1]["prompt"] == chat
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--policy", str(tiny_world.sft_dir), "--reference", str(tiny_world.sft_dir),
                  "--prompts", str(prompts), "--reward", "my_reward:nope"])
    assert e.value.code == 2 and "cannot import 'nope' from 'my_reward'" in capsys.readouterr().err


def test_default_reward_is_named_as_the_demo_lexicon():
    from sparsepo.demo.user_reward import LEXICON, load_reward

    score, name = load_reward(None)
    assert name == LEXICON and "demo's sentiment lexicon" in name
    assert score(["x"], ["good good", "awful"]) == [2.0, -2.0]


def test_reward_model_directory_scores_prompt_plus_response(tiny_world, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from sparsepo.demo.user_reward import load_reward

    cfg = AutoConfig.from_pretrained(tiny_world.sft_dir, num_labels=1)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tiny_world.sft_dir)
    tok.save_pretrained(tmp_path / "rm")
    score, name = load_reward(str(tmp_path / "rm"))
    assert name == f"the reward model in {tmp_path / 'rm'}"
    with torch.no_grad():
        want = float(rm(**tok(["Story about the old play: it was good"], return_tensors="pt")).logits[0, 0])
    assert score(["Story about the old play:"], [" it was good"]) == [pytest.approx(want, abs=1e-5)]


def test_eval_reports_a_missing_policy_directory_as_missing(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["hi"])
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--policy", "runs/demo/run-spo/final", "--reference", str(tmp_path), "--prompts", str(prompts)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--policy runs/demo/run-spo/final: no such model directory" in err
    assert "Repo id" not in err


def test_conversational_prompt_rows_are_checked_naming_the_line(tmp_path):
    from sparsepo.demo.evaluate import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"prompt": 3}))
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected 'prompt' as a non-empty string or a list"):
        read_prompts(path)


def test_cached_demo_oracle_is_retrained_when_the_run_asks_for_other_settings(tmp_path, monkeypatch):
    import argparse

    import sparsepo.oracle_train as ot
    from sparsepo.demo.cached import demo_oracle

    trained = []

    def fake_train(recipe, out, **kw):
        trained.append(kw["overrides"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "oracle.json").write_text("{}")

    monkeypatch.setattr(ot, "train_oracle", fake_train)
    world = argparse.Namespace(root=tmp_path, sft_dir=tmp_path / "sft", train_path=tmp_path / "t.jsonl")
    go = lambda overrides: demo_oracle(world, oracle="policy", seed=0, nproc=1, overrides=overrides,  # noqa: E731
                                       force=False, recipe=tmp_path / "r.yaml", launch=None)
    go(["train.max_steps=20"])
    go(["train.max_steps=20", "method.rho=0.2", "logging.output_dir=x"])  # the policy's own keys: reused
    assert len(trained) == 1
    go([])  # a full run: the 20-step oracle is not reused
    assert len(trained) == 2 and trained[1] == [f"data.path={world.train_path}", "logging.overwrite=true"]
    (tmp_path / "oracle" / "demo_settings.json").unlink()  # an oracle cached before settings were recorded
    go([])
    assert len(trained) == 3


def test_demo_method_choices_are_the_loss_table_and_appear_in_help(capsys):
    from sparsepo.losses import METHODS

    assert cli.DEMO_METHODS == tuple(METHODS)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "simpo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--method", "dpoo"])
    assert e.value.code == 2 and "invalid choice: 'dpoo'" in capsys.readouterr().err


@pytest.fixture
def demo_calls(monkeypatch, tmp_path):
    """`sparsepo demo` with the world, launches, SAE and evaluation replaced by recorders."""
    import argparse

    import sparsepo.demo as demo

    world = argparse.Namespace(root=tmp_path / "world", sft_dir=tmp_path / "sft", train_path=tmp_path / "train.jsonl",
                               eval_prompts_path=tmp_path / "eval.jsonl")
    calls = {"launch": [], "eval": [], "sae": []}

    def launch(config, overrides, *, nproc=1, resume=None):
        calls["launch"].append(overrides)
        out = [o.split("=", 1)[1] for o in overrides if o.startswith("logging.output_dir=")][-1]
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        return 0

    def evaluate(policy, reference, prompts, **kw):
        calls["eval"].append((str(policy), str(reference)))
        return {"win_rate": 0.5, "kl": 0.0, "policy_reward": 0.0, "reference_reward": 0.0, "policy_length": 1.0,
                "reference_length": 1.0, "policy_ended_fraction": 1.0, "reference_ended_fraction": 1.0, "n": 1,
                "max_new_tokens": 1, "reward": "x"}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "prepare_world", lambda *a, **k: world)
    monkeypatch.setattr(demo, "evaluate_policy", evaluate)
    monkeypatch.setattr(cli, "launch_train", launch)
    monkeypatch.setattr(cli, "demo_sae", lambda w, o, *, force, steps: calls["sae"].append(steps) or tmp_path / "sae")
    return lambda *argv: (_run(argv), calls)[1]


def _run(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--workdir", "runs", *argv])
    assert e.value.code == 0


def test_demo_overrides_hold_through_evaluation(demo_calls):
    calls = demo_calls("--method", "spo", "reference.mode=inline", "logging.output_dir=D", "model.path=M")
    assert calls["eval"][-1] == ("D/final", "M")  # the run trained into D from M: evaluated there, against M
    calls = demo_calls("--method", "dpo")
    assert calls["eval"][-1][0] == "runs/run-dpo/final"
    calls = demo_calls("--method", "fpo", "--sae-steps", "7")
    assert calls["sae"] == [7]
