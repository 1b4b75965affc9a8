"""SePO's length filters (the authors' data step) on hand-made rows: each pair left out is in the skip
report with its reason, the lengths are those before truncation, and the run's filter comes from one
place (`pair_filter_for`), so training and precompute read the same rows.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sepo_filters.py -q

Token counts use test_data's word-level tokenizer: prompt "what is p1" = [<s>, what, is, p1] = 4;
a response counts its words (the eos the pipeline appends is not counted).
"""

from __future__ import annotations

import json

import pytest

from sparsepo.config import load_config
from sparsepo.data import load_preference_dataset
from sparsepo.data.filters import PairFilter, pair_filter_for
from test_data import cfg_for, make_tokenizer, write_jsonl

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


ROWS = [
    {"prompt": "what is p1", "chosen": "yes c1 c2 c3", "rejected": "no r1 r2 r3"},        # 4 / 4 / 4: kept
    {"prompt": "what is p2 p3 p4", "chosen": "yes c1 c2 c3", "rejected": "no r1 r2 r3"},  # prompt 6 > 5
    {"prompt": "what is p5", "chosen": "yes c4", "rejected": "no r4 r5 r6"},              # chosen 2 < 3
    {"prompt": "what is p6", "chosen": "yes c5 c6 c7", "rejected": "no"},                 # rejected 1 < 3
    {"prompt": "what is p7", "chosen": "yes c8 c9 c10", "rejected": "no r7 r8"},          # 4 / 3: kept
]


def test_pair_filter_reasons_by_hand():
    f = PairFilter(max_prompt_tokens=5, min_response_tokens=3, owner="method")
    assert f.reason(prompt_tokens=5, chosen_tokens=3, rejected_tokens=3) is None
    assert f.reason(prompt_tokens=6, chosen_tokens=1, rejected_tokens=1) == \
        ("prompt", "filtered: 6 prompt tokens, more than method.max_prompt_tokens=5")
    assert f.reason(prompt_tokens=5, chosen_tokens=3, rejected_tokens=2) == \
        ("rejected", "filtered: 2 rejected tokens, fewer than method.min_response_tokens=3")
    assert not PairFilter(max_prompt_tokens=None, min_response_tokens=0).active
    with pytest.raises(ValueError, match="method.min_response_tokens"):
        PairFilter(min_response_tokens=-1, owner="method")


def test_filtered_pairs_are_in_the_skip_report_with_their_reason(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    run = tmp_path / "run"
    f = PairFilter(max_prompt_tokens=5, min_response_tokens=3, owner="method")
    ds, report = load_preference_dataset(cfg_for(path, tmp_path), tok, run_dir=run, pair_filter=f)
    assert len(ds) == report.kept == 2 and report.filtered == 3 and report.skipped == 0
    assert "prompt_tokens" not in ds.column_names
    lines = [json.loads(x) for x in (run / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in lines] == [(2, "prompt"), (3, "chosen"), (4, "rejected")]
    assert lines[0]["reason"] == "filtered: 6 prompt tokens, more than method.max_prompt_tokens=5"
    assert lines[1]["reason"] == "filtered: 2 chosen tokens, fewer than method.min_response_tokens=3"
    unfiltered, plain = load_preference_dataset(cfg_for(path, tmp_path), tok)
    assert len(unfiltered) == 5 and plain.filtered == 0
    assert set(ds["example_id"]) == {unfiltered[0]["example_id"], unfiltered[4]["example_id"]}


def test_prompt_limit_reads_the_length_before_truncation(tmp_path, tok):
    """max_prompt_length=3 cuts row 2's 6-token prompt to 3, yet the filter sees 6 (as the authors'
    filter runs before their truncation)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS[:2])
    cfg = cfg_for(path, tmp_path, max_length=8, max_prompt_length=3)
    ds, report = load_preference_dataset(cfg, tok, pair_filter=PairFilter(max_prompt_tokens=5))
    assert report.filtered == 1 and len(ds) == 1
    assert report.skipped_rows[0].reason.startswith("filtered: 6 prompt tokens")


def test_the_run_filter_comes_from_the_sepo_params_only():
    sepo = load_config(None, ["method.name=sepo", "reference.oracle=/tmp/o"])
    f = pair_filter_for(sepo)
    assert (f.max_prompt_tokens, f.min_response_tokens) == (1900, 8)
    off = load_config(None, ["method.name=sepo", "reference.oracle=/tmp/o", "method.min_response_tokens=0",
                             "method.max_prompt_tokens=null"])
    assert pair_filter_for(off) is None
    assert pair_filter_for(load_config(None, ["method.name=dpo"])) is None
