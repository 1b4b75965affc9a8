"""Issue 25: `sparsepo eval` refuses in one line with exit 2 (never a traceback), and says which
tokenizer it uses when a directory has none."""

from __future__ import annotations

import json
import logging

import pytest

from sparsepo.cli import main
from test_evaluate_tokenizer import save_tokenizer

pytestmark = pytest.mark.unit


def run_eval(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["eval", *args])
    return e.value.code, capsys.readouterr().err


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    return path


def test_mismatched_tokenizers_are_one_line_exit_2(tmp_path, prompts, capsys):
    policy = save_tokenizer(tmp_path / "policy", ["hello", "world"])
    reference = save_tokenizer(tmp_path / "reference", ["world", "hello"])
    code, err = run_eval(capsys, "--policy", str(policy), "--reference", str(reference), "--prompts", str(prompts))
    assert code == 2 and err.startswith("sparsepo eval: the tokenizers differ") and err.count("\n") == 1, err


@pytest.mark.parametrize("case, expect", [
    ("no_policy", "--policy {tmp}/missing: no such model directory"),
    ("no_prompts", "--prompts {tmp}/none.jsonl: no such file"),
    ("bad_json", "{tmp}/prompts.jsonl:2: not a JSON object"),
    ("samples", "--samples-per-prompt 0 must be >= 1"),
])
def test_every_refusal_is_one_line_exit_2(tmp_path, prompts, capsys, case, expect):
    policy = save_tokenizer(tmp_path / "policy", ["hello", "world"])
    args = {"--policy": str(policy), "--reference": str(policy), "--prompts": str(prompts)}
    extra = []
    if case == "no_policy":
        args["--policy"] = str(tmp_path / "missing")
    elif case == "no_prompts":
        args["--prompts"] = str(tmp_path / "none.jsonl")
    elif case == "bad_json":
        prompts.write_text(json.dumps({"prompt": "a"}) + "\n{oops\n")
    else:
        extra = ["--samples-per-prompt", "0"]
    code, err = run_eval(capsys, *[x for kv in args.items() for x in kv], *extra)
    assert code == 2, err
    assert err.startswith(f"sparsepo eval: {expect.format(tmp=tmp_path)}") and err.count("\n") == 1, err


def test_a_reference_without_a_tokenizer_is_warned_with_the_rule(tmp_path, caplog):
    from sparsepo.demo.evaluate import check_same_tokenizer

    policy = save_tokenizer(tmp_path / "policy", ["hello", "world"])
    (tmp_path / "bare").mkdir()
    with caplog.at_level(logging.WARNING, logger="sparsepo"):
        check_same_tokenizer(policy, tmp_path / "bare")
    assert f"reference directory {tmp_path / 'bare'} holds no tokenizer" in caplog.text
    assert f"the tokenizer in {policy}" in caplog.text and "the rule" in caplog.text
