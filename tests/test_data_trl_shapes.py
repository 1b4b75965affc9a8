"""TRL's data shapes beyond the explicit prompt: string pairs without a prompt (TRL's
`extract_prompt`: the longest common prefix, a trailing space left to the responses), content-part
messages, and `data.chat_template` (a file or the template text)."""

from __future__ import annotations

import pytest

from sparsepo.config import ConfigError, load_config
from sparsepo.data import DataError
from sparsepo.data.rows import BadRow, implicit_string_prompt
from test_data import TEMPLATE, chat_pairs, load, make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_implicit_string_prompt_by_hand():
    assert implicit_string_prompt("what is p1 yes c1", "what is p1 no r1") == ("what is p1", " yes c1", " no r1")
    assert implicit_string_prompt("ab", "ac") == ("a", "b", "c")  # no space: cut where they part
    with pytest.raises(BadRow, match="share no leading text"):
        implicit_string_prompt("yes", "no")
    with pytest.raises(BadRow, match="nothing after the prompt"):
        implicit_string_prompt("hi there", "hi there  ")


def test_string_pairs_without_prompt_equal_the_explicit_split(tmp_path, tok):
    explicit = [{"prompt": f"what is p{i}", "chosen": f" yes c{i}", "rejected": f" no r{i}"} for i in range(3)]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    a, _ = load(write_jsonl(tmp_path / "e.jsonl", explicit), tmp_path, tok)
    b, rep = load(write_jsonl(tmp_path / "i.jsonl", implicit), tmp_path, tok)
    assert rep.kept == 3
    for x, y in zip(a, b):
        assert (x["prompt_ids"], x["chosen_ids"], x["rejected_ids"]) == \
               (y["prompt_ids"], y["chosen_ids"], y["rejected_ids"])


def test_string_pairs_sharing_nothing_are_a_bad_row_naming_the_fix(tmp_path, tok):
    path = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match=r"n\.jsonl: line 1: field 'prompt': no prompt column, and chosen and "
                                        r"rejected share no leading text"):
        load(path, tmp_path, tok)


def parts(messages):
    return [{**m, "content": [{"type": "text", "text": w + " "} for w in m["content"].split()]} for m in messages]


def test_content_parts_are_joined_text(tmp_path, tok):
    plain = chat_pairs()
    # "hello c0" as parts "hello ", "c0 ": the joined text differs only in a trailing space, which the
    # whitespace tokenizer drops, so the ids must equal the plain messages'
    split = [{k: parts(v) for k, v in r.items()} for r in plain]
    a, _ = load(write_jsonl(tmp_path / "p.jsonl", plain), tmp_path, tok)
    b, _ = load(write_jsonl(tmp_path / "q.jsonl", split), tmp_path, tok)
    assert [(x["prompt_ids"], x["chosen_ids"]) for x in a] == [(y["prompt_ids"], y["chosen_ids"]) for y in b]


def test_a_non_text_part_is_a_bad_row(tmp_path, tok):
    rec = chat_pairs(1)[0]
    rec["prompt"][1]["content"] = [{"type": "image", "text": None}, {"type": "text", "text": "hi p0"}]
    with pytest.raises(DataError, match=r"field 'prompt': message 1: content part 0 is 'image'"):
        load(write_jsonl(tmp_path / "img.jsonl", [rec]), tmp_path, tok)


def test_chat_template_from_a_file_or_the_text(tmp_path, tiny_tokenizer_dir):
    from sparsepo.rundata import load_run_tokenizer as run_tokenizer

    other = TEMPLATE.replace("<|assistant|> {% endif %}", "<|assistant|> ok {% endif %}")
    (tmp_path / "t.jinja").write_text(other)
    for value in (str(tmp_path / "t.jinja"), other):
        cfg = load_config(None, [f"model.path={tiny_tokenizer_dir}", f"data.chat_template={value!r}"])
        assert run_tokenizer(cfg).chat_template == other
    cfg = load_config(None, [f"model.path={tiny_tokenizer_dir}", f"data.chat_template={tmp_path / 'none.jinja'}"])
    with pytest.raises(ConfigError, match=r"data.chat_template .*none\.jinja: no such file"):
        run_tokenizer(cfg)
    assert run_tokenizer(load_config(None, [f"model.path={tiny_tokenizer_dir}"])).chat_template == TEMPLATE


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    make_tokenizer().save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"
