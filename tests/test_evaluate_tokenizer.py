"""`sparsepo eval` refuses a policy and reference whose tokenizers differ (it scores both on one
tokenizer's ids).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_evaluate_tokenizer.py -q
"""

from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from sparsepo.demo.evaluate import check_same_tokenizer, evaluate_policy

pytestmark = pytest.mark.unit


def save_tokenizer(path, words):
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hello world"}) + "\n")
    return path


def test_different_tokenizers_are_refused_naming_both_paths(tmp_path, prompts):
    policy = save_tokenizer(tmp_path / "policy", ["hello", "world"])
    reference = save_tokenizer(tmp_path / "reference", ["world", "hello"])  # same words, other ids
    with pytest.raises(ValueError, match="the tokenizers differ") as e:
        evaluate_policy(policy, reference, prompts, progress=False)
    assert f"policy {policy} (tokenizer digest" in str(e.value)
    assert f"reference {reference} (tokenizer digest" in str(e.value)


def test_same_tokenizer_resaved_passes(tmp_path):
    """Re-saving changes tokenizer_config.json's bytes but not the ids: not a mismatch. A directory
    without a tokenizer is skipped."""
    policy = save_tokenizer(tmp_path / "policy", ["hello", "world"])
    transformers.AutoTokenizer.from_pretrained(policy).save_pretrained(tmp_path / "resaved")
    (tmp_path / "bare").mkdir()
    check_same_tokenizer(policy, tmp_path / "resaved")
    check_same_tokenizer(policy, tmp_path / "bare")
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path / 'other'}"):
        check_same_tokenizer(policy, tmp_path / "resaved", save_tokenizer(tmp_path / "other", ["hello"]))
