"""Preference data pipeline: formats, shapes, validation, truncation, ids, cache, collate, order.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_data.py -q

The tokenizer is built locally: a WordLevel vocabulary over the words used below, whitespace
pre-tokenisation, NFD + strip-accents normaliser (so a lone combining accent tokenises to nothing),
a "<s> $A" post-processor (bos on add_special_tokens=True) and a small Jinja chat template.
Lengths in docstrings count tokens: "what is p3" → [<s>, what, is, p3] = 4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import datasets
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from sparsepo.config import DataConfig
from sparsepo.data import (DataError, PairBatch, collate_pairs, dataset_fingerprint, epoch_order,
                           gather_rows, load_preference_dataset, micro_batch_indices,
                           steps_per_epoch, write_skip_report)
from sparsepo.data import rows as rows_mod
from sparsepo.data import sources
from sparsepo.data.rows import BadRow, Overlong, example_id, truncate_pair

datasets.disable_progress_bars()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ("hi there hello how are you fine thanks what is yes no good bad".split()
         + [f"{c}{i}" for c in "pcrw" for i in range(40)])
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
BOS, EOS = 2, 3


def make_tokenizer(chat_template: str | None = TEMPLATE):
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(),
                                          normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pairs(n=6):
    return [{"prompt": f"what is p{i}", "chosen": f"yes c{i}", "rejected": f"no r{i}"} for i in range(n)]


def chat_pairs(n=3):
    return [{"prompt": [{"role": "system", "content": "be good"}, {"role": "user", "content": f"hi p{i}"}],
             "chosen": [{"role": "assistant", "content": f"hello c{i}"}],
             "rejected": [{"role": "assistant", "content": f"bad r{i}"}]} for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg_for(path, tmp_path, **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "hf_cache"), **kw)


def load(path, tmp_path, tok, **kw):
    return load_preference_dataset(cfg_for(path, tmp_path, **kw), tok)


# ---------------------------------------------------------------------------- formats and shapes

def test_every_format_gives_the_same_pairs_and_ids(tmp_path, tok):
    recs = pairs()
    src = datasets.Dataset.from_list(recs)
    (tmp_path / "a.json").write_text(json.dumps(recs))
    src.to_parquet(str(tmp_path / "a.parquet"))
    src.to_csv(str(tmp_path / "a.csv"), index=False)
    src.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": src.select([0]), "test": src}).save_to_disk(str(tmp_path / "dd"))
    base, rep = load(write_jsonl(tmp_path / "a.jsonl", recs), tmp_path, tok)
    assert rep.rows == rep.kept == 6 and rep.format == "jsonl"
    assert base.column_names == ["example_id", "prompt_ids", "chosen_ids", "rejected_ids"]
    for path, kw in [("a.json", {}), ("a.parquet", {}), ("a.csv", {}), ("disk", {}),
                     ("dd", {"split": "test"})]:
        ds, rep = load(tmp_path / path, tmp_path, tok, **kw)
        assert ds.to_list() == base.to_list(), path
        assert rep.fingerprint == dataset_fingerprint(base)
    with pytest.raises(DataError, match=r"splits \['test', 'train'\], none named 'dev'.*data.split"):
        load(tmp_path / "dd", tmp_path, tok, split="dev")


def test_string_tokenisation_convention(tmp_path, tok):
    ds, _ = load(write_jsonl(tmp_path / "a.jsonl", pairs(2)), tmp_path, tok)
    row = ds[1]
    assert row["prompt_ids"] == tok("what is p1")["input_ids"] == [BOS] + ids(tok, "what is p1")
    assert row["chosen_ids"] == ids(tok, "yes c1") + [EOS]
    assert row["rejected_ids"] == ids(tok, "no r1") + [EOS]
    assert row["example_id"] == example_id("what is p1", "yes c1", "no r1")


def test_chat_shape_applies_the_template(tmp_path, tok):
    recs = chat_pairs()
    ds, _ = load(write_jsonl(tmp_path / "c.jsonl", recs), tmp_path, tok)
    p, c = recs[0]["prompt"], recs[0]["chosen"]
    prompt_text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(p + c, tokenize=False)
    assert full.startswith(prompt_text)
    assert prompt_text == "<s><|system|> be good </s> <|user|> hi p0 </s> <|assistant|> "
    # The template wrote bos; add_special_tokens=False adds no second one.
    assert ds[0]["prompt_ids"] == ids(tok, prompt_text) and ds[0]["prompt_ids"].count(BOS) == 1
    # "hello c0 </s> " already ends with eos: none appended.
    assert ds[0]["chosen_ids"] == ids(tok, "hello c0 </s> ") == ids(tok, "hello c0") + [EOS]
    assert ds[0]["example_id"] == example_id(p, c, recs[0]["rejected"])


def test_chat_response_is_the_template_rendering_without_an_appended_eos(tmp_path):
    """TRL 1.16: a conversational response is the template's text as is. A template that ends a turn
    with something after eos (ChatML: "<|im_end|>\n") or without eos gets no eos appended (before:
    one eos too many after ChatML's newline)."""
    tok = make_tokenizer(TEMPLATE.replace(" </s> ", " <|user|> "))  # turns end with a marker that is not eos
    recs = chat_pairs()
    ds, _ = load(write_jsonl(tmp_path / "c.jsonl", recs), tmp_path, tok)
    assert ds[0]["chosen_ids"] == ids(tok, "hello c0 <|user|>")
    assert EOS not in ds[0]["chosen_ids"] + ds[0]["rejected_ids"]


def test_tools_and_chat_template_kwargs_reach_the_template(tmp_path):
    """TRL 1.16 hands a row's `tools` and `chat_template_kwargs` columns to apply_chat_template; so does
    sparsepo (before: both columns were ignored without a word). Rows that differ only in them are
    different pairs (their ids differ), not duplicates."""
    template = ("{{ bos_token }}{% if tools %}<|system|> {% for t in tools %}{{ t['name'] }} {% endfor %}</s> "
                "{% endif %}{% if think %}w9 {% endif %}" + TEMPLATE.split("}}", 1)[1])
    tok = make_tokenizer(template)
    base = chat_pairs(1)[0]
    recs = [dict(base, tools=[{"name": "w1"}, {"name": "w2"}], chat_template_kwargs={"think": True}),
            dict(base, tools=[{"name": "w3"}], chat_template_kwargs={"think": False})]
    ds, report = load(write_jsonl(tmp_path / "t.jsonl", recs), tmp_path, tok)
    assert len(ds) == 2 and ds[0]["example_id"] != ds[1]["example_id"]
    assert ds[0]["prompt_ids"][:7] == [BOS] + ids(tok, "<|system|> w1 w2 </s> w9 <|system|>")
    assert ds[1]["prompt_ids"][:5] == [BOS] + ids(tok, "<|system|> w3 </s> <|system|>")
    assert ds[0]["chosen_ids"] == ids(tok, "hello c0 </s>")


def test_implicit_prompt_is_the_shared_prefix(tmp_path, tok):
    explicit = chat_pairs()
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in explicit]
    a, _ = load(write_jsonl(tmp_path / "e.jsonl", explicit), tmp_path, tok)
    b, _ = load(write_jsonl(tmp_path / "i.jsonl", implicit), tmp_path, tok)
    for x, y in zip(a, b):
        assert (x["prompt_ids"], x["chosen_ids"], x["rejected_ids"]) == \
               (y["prompt_ids"], y["chosen_ids"], y["rejected_ids"])
        assert x["example_id"] != y["example_id"]  # ids hash the original form


def test_chat_without_template_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", chat_pairs())
    with pytest.raises(DataError, match=r"c\.jsonl: the pairs are chat messages, but the tokenizer "
                                        r"has no chat template"):
        load(path, tmp_path, make_tokenizer(chat_template=None))


def test_chat_template_that_cannot_split_prompt_from_response(tmp_path):
    odd = make_tokenizer(TEMPLATE.replace("<|assistant|> {% endif %}", "<|assistant|>: {% endif %}"))
    path = write_jsonl(tmp_path / "c.jsonl", chat_pairs())
    with pytest.raises(DataError, match=r"c\.jsonl: line 1: field 'chosen': the chat template's "
                                        r"rendering of prompt \+ response does not start with"):
        load(path, tmp_path, odd)


def _chat(prompt_roles, chosen_roles, rejected_roles=("assistant",)):
    msgs = lambda roles, tag: [{"role": r, "content": f"hi {tag}{i}"} for i, r in enumerate(roles)]
    return {"prompt": msgs(prompt_roles, "p"), "chosen": msgs(chosen_roles, "c"),
            "rejected": msgs(rejected_roles, "r")}


BAD_ROLES = [
    ("typo", _chat(["user"], ["assitant"]), "chosen",
     "message 0: unknown role 'assitant' (did you mean 'assistant'?)"),
    ("typo in prompt", _chat(["sytem", "user"], ["assistant"]), "prompt",
     "message 0: unknown role 'sytem' (did you mean 'system'?)"),
    ("system as the response", _chat(["user"], ["system"]), "chosen", "message 0: a 'system' message in the response"),
    ("user inside the response", _chat(["user"], ["assistant"], ["assistant", "user", "assistant"]), "rejected",
     "message 1: a 'user' message in the response"),
    ("response ends with a tool", _chat(["user"], ["assistant", "tool"]), "chosen",
     "message 1: the response ends with a 'tool' message, not an assistant one"),
    ("implicit prompt, system reply", {"chosen": [{"role": "user", "content": "hi p0"},
                                                  {"role": "system", "content": "hi c0"}],
                                       "rejected": [{"role": "user", "content": "hi p0"},
                                                    {"role": "assistant", "content": "hi r0"}]},
     "chosen", "message 1: a 'system' message in the response"),
]


@pytest.mark.parametrize("name,bad,field,reason", BAD_ROLES, ids=[b[0] for b in BAD_ROLES])
def test_chat_roles_are_validated_like_any_bad_row(tmp_path, tok, name, bad, field, reason):
    recs = chat_pairs(4) if "prompt" in bad else [{"chosen": r["prompt"] + r["chosen"],
                                                   "rejected": r["prompt"] + r["rejected"]} for r in chat_pairs(4)]
    recs[1] = bad  # line 2
    path = write_jsonl(tmp_path / "roles.jsonl", recs)
    with pytest.raises(DataError) as e:
        load(path, tmp_path, tok)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and f"field {field!r}" in msg and reason in msg, msg
    ds, rep = load(path, tmp_path, tok, on_bad_row="skip", max_skip_fraction=0.5)
    assert len(ds) == 3 and [(b.row, b.field) for b in rep.skipped_rows] == [(2, field)]
    assert reason in rep.skipped_rows[0].reason


def test_chat_roles_that_are_fine(tmp_path, tok):
    """A system prompt, a multi-turn prompt and an assistant -> tool -> assistant response load."""
    rec = _chat(["system", "user", "assistant", "user"], ["assistant", "tool", "assistant"], ["assistant"])
    ds, rep = load(write_jsonl(tmp_path / "ok.jsonl", [rec]), tmp_path, tok)
    assert len(ds) == 1 and rep.skipped == 0


# -------------------------------------------------------------------------------------- ids

def test_example_id_is_sha256_of_canonical_json():
    canon = json.dumps({"chosen": "b", "prompt": "a", "rejected": "c"}, sort_keys=True,
                       ensure_ascii=False, separators=(",", ":"))
    assert example_id("a", "b", "c") == hashlib.sha256(canon.encode()).hexdigest()[:16]
    assert example_id("a", "b", "c") != example_id("a", "b", "c ")
    assert example_id("a", "b", "c") != example_id("a", "c", "b")
    m = [{"role": "user", "content": "x"}]
    assert example_id(m, m, [{"role": "user", "content": "y", "name": None}]) == \
           example_id(m, m, [{"content": "y", "role": "user"}])  # Arrow's null padding ignored


def test_ids_stable_across_formats_and_change_with_content(tmp_path, tok):
    recs = pairs(3)
    a, _ = load(write_jsonl(tmp_path / "a.jsonl", recs), tmp_path, tok)
    datasets.Dataset.from_list(recs[::-1]).to_parquet(str(tmp_path / "b.parquet"))
    b, _ = load(tmp_path / "b.parquet", tmp_path, tok)
    assert a["example_id"][:] == b["example_id"][:][::-1]
    assert dataset_fingerprint(a) != dataset_fingerprint(b)  # order matters to the cache key
    recs[1]["chosen"] = "yes c9"
    c, _ = load(write_jsonl(tmp_path / "c.jsonl", recs), tmp_path, tok)
    assert [x == y for x, y in zip(a["example_id"], c["example_id"])] == [True, False, True]


def test_fingerprint_keys_on_settings_and_survives_select(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", pairs())
    a, rep = load(path, tmp_path, tok)
    assert rep.fingerprint == dataset_fingerprint(a) == dataset_fingerprint(load(path, tmp_path, tok)[0])
    assert dataset_fingerprint(load(path, tmp_path, tok, max_length=63)[0]) != rep.fingerprint
    assert dataset_fingerprint(a.select([0, 1])) != rep.fingerprint
    with pytest.raises(DataError, match="load_preference_dataset"):
        dataset_fingerprint(datasets.Dataset.from_dict({"example_id": ["x"]}))


# ------------------------------------------------------------------------------- truncation

def test_truncate_pair_modes_by_hand():
    p, c, r = [BOS, 10, 11, 12, 13, 14, 15], [20, 21, 22, EOS], [30, 31, 32, 33, 34, EOS]
    assert truncate_pair(p, c, r, max_length=13, max_prompt_length=4, mode="error") == (p, c, r, False)
    # 7 + 6 = 13 > 12. prompt_first: bos + last 3 → 4 tokens, responses fit in 12 - 4 = 8.
    assert truncate_pair(p, c, r, max_length=12, max_prompt_length=4, mode="prompt_first",
                         bos_id=BOS) == ([BOS, 13, 14, 15], c, r, True)
    # Without a bos to keep, the last 4 prompt tokens.
    assert truncate_pair(p[1:], c, r, max_length=9, max_prompt_length=4, mode="prompt_first",
                         bos_id=BOS)[0] == [12, 13, 14, 15]
    # response_only: prompt 7 stays, responses cut to 12 - 7 = 5 from the right (rejected loses eos).
    assert truncate_pair(p, c, r, max_length=12, max_prompt_length=4, mode="response_only") == \
           (p, c, [30, 31, 32, 33, 34], True)
    with pytest.raises(Overlong, match="prompt 7 .* exceed data.max_length=12"):
        truncate_pair(p, c, r, max_length=12, max_prompt_length=4, mode="error")
    with pytest.raises(BadRow, match="no room for a response"):
        truncate_pair(p, c, r, max_length=7, max_prompt_length=4, mode="response_only")


def test_truncation_end_to_end(tmp_path, tok, caplog):
    long_prompt = " ".join(f"w{i}" for i in range(10))  # 11 tokens with bos
    recs = [{"prompt": long_prompt, "chosen": "c1 c2 c3 c4", "rejected": "r1 r2 r3 r4 r5 r6 r7 r8"},
            {"prompt": "hi", "chosen": "yes", "rejected": "no"}]
    path = write_jsonl(tmp_path / "t.jsonl", recs)
    with caplog.at_level(logging.INFO, logger="sparsepo.data.pipeline"):
        ds, rep = load(path, tmp_path, tok, max_length=12, max_prompt_length=4)
    assert rep.truncated == 1 and "1 truncated" in caplog.text
    row = ds[0]  # prompt keeps bos + its END (w7 w8 w9); responses get 12 - 4 = 8
    assert row["prompt_ids"] == [BOS] + ids(tok, "w7 w8 w9")
    assert row["chosen_ids"] == ids(tok, "c1 c2 c3 c4") + [EOS]
    assert row["rejected_ids"] == ids(tok, "r1 r2 r3 r4 r5 r6 r7 r8")  # 9 with eos → cut to 8
    ds, rep = load(path, tmp_path, tok, max_length=13, truncation="response_only")
    assert ds[0]["prompt_ids"] == tok(long_prompt)["input_ids"]
    assert ds[0]["chosen_ids"] == ids(tok, "c1 c2") and ds[0]["rejected_ids"] == ids(tok, "r1 r2")
    with pytest.raises(DataError, match=r"t\.jsonl: line 1: prompt 11 \+ chosen 5 / rejected 9 "
                                        r"tokens exceed data.max_length=12.*data.truncation="):
        load(path, tmp_path, tok, max_length=12, truncation="error")


# ----------------------------------------------------------------------------- bad inputs

GOOD = {"prompt": "what is p0", "chosen": "yes c0", "rejected": "no r0"}
BAD_ROWS = [
    ("missing field", {"prompt": "hi", "rejected": "no"}, "chosen", "missing or null"),
    ("empty field", {**GOOD, "chosen": ""}, "chosen", "empty string"),
    ("whitespace", {**GOOD, "rejected": "  \n"}, "rejected", "only whitespace"),
    ("none", {**GOOD, "prompt": None}, "prompt", "missing or null"),
    ("wrong type", {**GOOD, "chosen": 5}, "chosen", "expected a string, got int"),
    ("identical", {**GOOD, "rejected": "yes c0"}, "rejected", "identical to chosen"),
    ("identical after tokenisation", {**GOOD, "rejected": "YES C0"}, "rejected",
     "identical to chosen after tokenisation"),
    ("replacement char", {**GOOD, "chosen": "yes \ufffd c0"}, "chosen", "U+FFFD"),
    ("empty after tokenisation", {**GOOD, "chosen": "\u0301\u0301"}, "chosen",
     "empty after tokenisation"),
    ("chat content type", {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes",
                           "rejected": "no"}, "chosen", "expected a list of chat messages, got str"),
]


@pytest.mark.parametrize("name,bad,field,reason", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_names_file_line_field_and_reason(tmp_path, tok, name, bad, field, reason):
    recs = pairs(5)
    recs[2] = bad  # line 3 of the file
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError) as e:
        load(path, tmp_path, tok)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and f"field {field!r}" in msg and reason in msg, msg
    assert "data.on_bad_row=skip" in msg


def test_bad_row_in_parquet_is_numbered_by_record(tmp_path, tok):
    recs = pairs(4)
    recs[2]["rejected"] = ""
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet: row 3: field 'rejected': empty string"):
        load(tmp_path / "bad.parquet", tmp_path, tok)


def test_blank_lines_do_not_shift_jsonl_line_numbers(tmp_path, tok):
    recs = pairs(3)
    recs[2]["chosen"] = None
    text = json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n" + json.dumps(recs[2]) + "\n"
    (tmp_path / "b.jsonl").write_text(text)
    with pytest.raises(DataError, match=r"b\.jsonl: line 4: field 'chosen': missing or null"):
        load(tmp_path / "b.jsonl", tmp_path, tok)


UNREADABLE = [
    ("broken json", "x.jsonl", lambda lines: lines[:6] + [lines[6][:-4]] + lines[7:],
     r"line 7: not valid JSON"),
    ("lone surrogate", "x.jsonl",
     lambda lines: lines[:3] + ['{"prompt": "p", "chosen": "c \\ud800", "rejected": "r"}'] + lines[4:],
     r"line 4: field 'chosen': undecodable text: lone surrogate U\+D800"),
    ("invalid utf-8", "x.jsonl", b'{"prompt": "p", "chosen": "c \xff\xfe", "rejected": "r"}',
     r"line 5: not valid UTF-8 \(byte 0xff"),
    ("invalid utf-8 csv", "x.csv", b"a,\xff,c", r"line 5: not valid UTF-8"),
    ("text as parquet", "x.parquet", None, r"could not be read as Parquet .*magic bytes"),
    ("broken json array", "x.json", None, r"line 1: not valid JSON"),
]


@pytest.mark.parametrize("name,fname,edit,pattern", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_file_is_refused_naming_it(tmp_path, tok, name, fname, edit, pattern):
    path = tmp_path / fname
    lines = [json.dumps(r) for r in pairs(10)]
    if fname.endswith(".parquet"):
        path.write_text("\n".join(lines))  # text with a .parquet extension
    elif fname.endswith(".json"):
        path.write_text(json.dumps(pairs(10))[:-5])
    elif isinstance(edit, bytes):  # replace the 4th record (line 5 of a CSV: header + 4)
        if fname.endswith(".csv"):
            raw = [b"prompt,chosen,rejected"] + [b"a,b,c"] * 3 + [edit] + [b"a,b,c"]
        else:
            raw = [s.encode() for s in lines[:4]] + [edit] + [s.encode() for s in lines[5:]]
        path.write_bytes(b"\n".join(raw) + b"\n")
    else:
        path.write_text("\n".join(edit(lines)) + "\n")
    for on_bad_row in ("error", "skip"):  # an unparseable source is refused in both modes
        with pytest.raises(DataError, match=pattern) as e:
            load(path, tmp_path, tok, on_bad_row=on_bad_row)
        assert str(path) in str(e.value)


EMPTY = [("empty.jsonl", b""), ("blank.jsonl", b"\n\n  \n\t\n"), ("bom.jsonl", b"\xef\xbb\xbf\n"),
         ("empty.json", b""), ("empty.csv", b"\n"), ("header-only.csv", b"prompt,chosen,rejected\n"),
         ("empty-array.json", b"[]")]


@pytest.mark.parametrize("fname,raw", EMPTY, ids=[e[0] for e in EMPTY])
def test_file_without_rows_is_refused_naming_it(tmp_path, tok, fname, raw):
    """Today's readers fail on these with a bare StopIteration or "Instruction 'train' corresponds to
    no data"; the refusal must name the file and say it has no rows."""
    path = tmp_path / fname
    path.write_bytes(raw)
    with pytest.raises(DataError) as e:
        load(path, tmp_path, tok)
    assert str(e.value).startswith(f"data file {path} has no rows"), str(e.value)


def test_missing_columns_list_found_and_expected(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "chosen": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"m\.jsonl: missing column\(s\) \['rejected'\]; found columns "
                                        r"\['question', 'chosen', 'answer'\]; expected 'prompt'"):
        load(path, tmp_path, tok)


def test_missing_file_and_hub_fallback(tmp_path, tok, monkeypatch):
    with pytest.raises(DataError, match=r"nope/train\.jsonl: no such file"):
        load(tmp_path / "nope" / "train.jsonl", tmp_path, tok)
    with pytest.raises(DataError, match=r"no such file"):
        load("org/name", tmp_path, tok, format="jsonl")  # explicit local format: no hub attempt
    asked = []

    def offline(name, **kw):
        asked.append((name, kw["split"]))
        raise ConnectionError("offline")

    monkeypatch.setattr(sources.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"org/name: not found locally, and loading it as a hub "
                                        r"dataset \(split 'train'\) failed: ConnectionError"):
        load("org/name", tmp_path, tok)
    assert asked == [("org/name", "train")]


# ------------------------------------------------------------------- skip mode and duplicates

def test_skip_mode_reports_and_refuses_above_fraction(tmp_path, tok, caplog):
    recs = pairs(10)
    recs[3]["chosen"] = ""
    recs[7]["rejected"] = 7
    recs.append(dict(recs[0]))  # a duplicate of line 1, at line 11
    path = write_jsonl(tmp_path / "s.jsonl", recs)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="sparsepo.data.pipeline"):
        ds, rep = load_preference_dataset(cfg_for(path, tmp_path, on_bad_row="skip",
                                                  max_skip_fraction=0.2), tok, run_dir=run)
    assert (rep.rows, rep.kept, rep.skipped, rep.duplicates) == (11, 8, 2, 1)
    assert len(ds) == 8 and ds[3]["example_id"] == example_id(**pairs(10)[4])
    report = [json.loads(x) for x in (run / "skipped_rows.jsonl").read_text().splitlines()]
    assert report == [
        {"row": 4, "field": "chosen", "reason": "empty string"},
        {"row": 8, "field": "rejected", "reason": "expected a string, got int"},
        {"row": 11, "field": "pair", "reason": f"duplicate of line 1 (example_id {ds[0]['example_id']})"},
    ]
    assert "2 bad rows, 1 duplicates and 0 filtered pairs left out" in caplog.text
    cfg = cfg_for(path, tmp_path, on_bad_row="skip", max_skip_fraction=0.1)
    with pytest.raises(DataError, match=r"s\.jsonl: 2 of 11 rows are bad \(18\.18%\), more than "
                                        r"data.max_skip_fraction=0\.1.*skipped_rows\.jsonl"):
        load_preference_dataset(cfg, tok, run_dir=run)


def test_duplicates_dropped_under_error_mode_too(tmp_path, tok):
    recs = pairs(3) + pairs(3)[1:2]
    ds, rep = load(write_jsonl(tmp_path / "d.jsonl", recs), tmp_path, tok)
    assert (rep.kept, rep.duplicates, rep.skipped) == (3, 1, 0)
    assert rep.skipped_rows[0].row == 4 and "duplicate of line 2" in rep.skipped_rows[0].reason


def test_write_skip_report_empty(tmp_path):
    assert write_skip_report([], tmp_path / "r").read_text() == ""


# ---------------------------------------------------------------------------------- cache

def test_tokenisation_is_cached(tmp_path, tok, monkeypatch):
    calls = []
    real = rows_mod.tokenise_batch

    def counting(batch, **kw):
        calls.append(len(batch["chosen"]))
        return real(batch, **kw)

    monkeypatch.setattr(rows_mod, "tokenise_batch", counting)
    path = write_jsonl(tmp_path / "a.jsonl", pairs())
    a, _ = load(path, tmp_path, tok)
    assert calls == [6]
    b, _ = load(path, tmp_path, tok)
    assert calls == [6] and a.cache_files == b.cache_files and a.to_list() == b.to_list()
    assert str(tmp_path / "hf_cache" / "sparsepo_tokenised") in a.cache_files[0]["filename"]
    load(path, tmp_path, tok, max_length=40)  # a setting changed: tokenised again
    assert calls == [6, 6]
    load(path, tmp_path, make_tokenizer(TEMPLATE + " "))  # tokenizer changed: again
    assert calls == [6, 6, 6]


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["jsonl", "disk"])
def test_in_place_edit_keeping_mtime_is_not_served_stale(tmp_path, tok, fmt):
    """`cp -p` / `rsync -a` keep the mtime: `datasets` alone would serve its cached copy of the old
    rows (its cache keys on path + mtime). The source is keyed on its bytes instead."""
    import os

    old, new = pairs(), pairs()
    new[2] = {"prompt": "what is p2", "chosen": "good c2", "rejected": "bad r2"}
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "a.jsonl", old)
        rewrite = lambda: write_jsonl(path, new)  # noqa: E731
    else:  # a save_to_disk directory rewritten with the same state.json fingerprint
        path = tmp_path / "disk"
        datasets.Dataset.from_list(old).save_to_disk(str(path))
        state = (path / "state.json").read_text()

        def rewrite():
            datasets.Dataset.from_list(new).save_to_disk(str(tmp_path / "disk2"))
            for f in (tmp_path / "disk2").glob("*.arrow"):
                (path / f.name).write_bytes(f.read_bytes())
            (path / "state.json").write_text(state)
    files = [p for p in ([path] if path.is_file() else path.rglob("*"))]
    a, ra = load(path, tmp_path, tok)
    stamps = {f: os.stat(f) for f in files}
    rewrite()
    for f, st in stamps.items():
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    b, rb = load(path, tmp_path, tok)
    assert b["example_id"][2] == example_id(**new[2]) != a["example_id"][2]
    assert rb.fingerprint != ra.fingerprint and rb.source_sha256 != ra.source_sha256
    assert b["chosen_ids"][2][:1] == ids(tok, "good")


@pytest.mark.unit
def test_source_sha256_is_the_file_bytes(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", pairs())
    _, report = load(path, tmp_path, tok)
    assert report.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_num_proc_matches_single_process(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", pairs(20))
    a, _ = load(path, tmp_path, tok)
    b, _ = load(path, tmp_path / "other", tok, num_proc=2)
    assert a.to_list() == b.to_list()


# -------------------------------------------------------------------------------- collate

def test_collate_by_hand():
    rows = [{"example_id": "a", "prompt_ids": [2, 10, 11], "chosen_ids": [20, 3], "rejected_ids": [30, 31, 3]},
            {"example_id": "b", "prompt_ids": [2, 12], "chosen_ids": [21, 22, 23, 3], "rejected_ids": [32, 3]}]
    b = collate_pairs(rows, pad_id=0)
    assert b.input_ids.tolist() == [[2, 10, 11, 20, 3, 0],     # a chosen
                                    [2, 12, 21, 22, 23, 3],    # b chosen
                                    [2, 10, 11, 30, 31, 3],    # a rejected
                                    [2, 12, 32, 3, 0, 0]]      # b rejected
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1],
                                        [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert b.response_mask.dtype == torch.float32 and b.input_ids.dtype == torch.long
    assert b.prompt_lengths.tolist() == [3, 2, 3, 2] and b.response_lengths.tolist() == [2, 4, 3, 2]
    assert b.example_ids == ["a", "b"] and b.num_pairs == 2
    assert b.chosen(b.response_lengths).tolist() == [2, 4]
    assert b.rejected(b.response_lengths).tolist() == [3, 2]
    with pytest.raises(ValueError, match="2B=4"):
        b.chosen(torch.zeros(3))
    moved = b.to("cpu")
    assert isinstance(moved, PairBatch) and torch.equal(moved.input_ids, b.input_ids)
    padded = collate_pairs(rows, pad_id=0, pad_to_multiple_of=8)
    assert padded.input_ids.shape == (4, 8) and padded.response_mask[:, 6:].sum() == 0


def test_collate_from_loaded_rows(tmp_path, tok):
    ds, _ = load(write_jsonl(tmp_path / "a.jsonl", pairs(4)), tmp_path, tok)
    b = collate_pairs(gather_rows(ds, [2, 0]), pad_id=tok.pad_token_id)
    assert b.example_ids == [ds[2]["example_id"], ds[0]["example_id"]]
    assert b.input_ids[0, :7].tolist() == ds[2]["prompt_ids"] + ds[2]["chosen_ids"]  # 4 + 3
    assert (b.response_mask[:, 0] == 0).all()


# ---------------------------------------------------------------------------------- order

def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a) == list(range(50)) and a == epoch_order(50, seed=3, epoch=0)
    assert a != epoch_order(50, seed=3, epoch=1) and a != epoch_order(50, seed=4, epoch=0)
    assert epoch_order(50, seed=0, epoch=1) != epoch_order(50, seed=1, epoch=0)


def _global_batches(order, steps, micro, accum, dp):
    """Per step: the rows each (micro-step, rank) reads, flattened in time order."""
    return [[i for m in range(accum) for r in range(dp)
             for i in micro_batch_indices(order, step=s, micro_batch_size=micro, grad_accum=accum,
                                          dp_size=dp, dp_rank=r, micro_step=m)]
            for s in range(steps)]


def test_same_global_batches_across_layouts():
    order = epoch_order(37, seed=0, epoch=0)
    assert steps_per_epoch(37, 4) == 9  # 36 rows used, the last incomplete batch is dropped
    runs = [_global_batches(order, 9, micro, accum, dp)
            for micro, accum, dp in [(2, 1, 2), (4, 1, 1), (2, 2, 1), (1, 2, 2), (1, 1, 4)]]
    assert all(run == runs[0] for run in runs)
    assert runs[0] == [order[4 * s:4 * s + 4] for s in range(9)]
    # micro-step-major: micro-step 1 of rank 0 with micro=1, accum=2, dp=2 reads slot 2.
    assert micro_batch_indices(order, step=1, micro_batch_size=1, grad_accum=2, dp_size=2,
                               dp_rank=0, micro_step=1) == [order[4 + 2]]
    with pytest.raises(ValueError, match="step 9 needs rows"):
        micro_batch_indices(order, step=9, micro_batch_size=2, grad_accum=1, dp_size=2, dp_rank=0,
                            micro_step=0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        micro_batch_indices(order, step=0, micro_batch_size=2, grad_accum=1, dp_size=2, dp_rank=2,
                            micro_step=0)


def test_config_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", pairs(2))
    with pytest.raises(DataError, match="max_prompt_length=64 must be .* below data.max_length=64"):
        load(path, tmp_path, tok, max_prompt_length=64)
    with pytest.raises(DataError, match="data.truncation='left'"):
        load_preference_dataset(dataclasses.replace(cfg_for(path, tmp_path), truncation="left"), tok)
