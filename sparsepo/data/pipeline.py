"""Load, validate, deduplicate and tokenise preference pairs, and report every row left out.

    ds, report = load_preference_dataset(cfg.data, tokenizer, run_dir=cfg.logging.output_dir)

The tokenisation runs once, as a `datasets.map` whose cache is keyed by the sha256 of the
source's bytes (`sources.content_sha256`; datasets' own fingerprint for a hub dataset) plus `rows.settings_key` (tokenizer digest, lengths, truncation, pipeline version) and written to
<data.cache_dir or datasets' cache>/sparsepo_tokenised/<key>.arrow; a second load with the same
inputs reads that file instead of tokenising again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from sparsepo.atomic import atomic_write
from sparsepo.data import rows
from sparsepo.data.errors import DataError, SkippedRow
from sparsepo.data.sources import load_rows

log = logging.getLogger(__name__)

_IDS = datasets.List(datasets.Value("int32"))
OUTPUT_FEATURES = datasets.Features({
    "example_id": datasets.Value("string"), "prompt_ids": _IDS, "chosen_ids": _IDS,
    "rejected_ids": _IDS, "truncated": datasets.Value("bool"),
    "bad_field": datasets.Value("string"), "bad_reason": datasets.Value("string"),
    "overlong": datasets.Value("string"), "prompt_tokens": datasets.Value("int32"),
    "chosen_tokens": datasets.Value("int32"), "rejected_tokens": datasets.Value("int32"),
})
_WORK_COLUMNS = ["truncated", "bad_field", "bad_reason", "overlong", "prompt_tokens", "chosen_tokens",
                 "rejected_tokens"]
_LENGTHS = ("prompt_tokens", "chosen_tokens", "rejected_tokens")
_SETTINGS_TAG = "sparsepo.data tokenisation settings: "
SKIP_REPORT = "skipped_rows.jsonl"


@dataclass(kw_only=True)
class DataReport:
    """What `load_preference_dataset` did with the source's rows."""

    source: str
    format: str
    rows: int
    """Rows read from the source."""
    kept: int
    """Rows in the returned dataset: rows - skipped - duplicates - filtered."""
    skipped: int
    """Bad rows left out (on_bad_row=skip)."""
    duplicates: int
    """Later copies of an earlier pair (same example id), left out in either on_bad_row mode."""
    filtered: int = 0
    """Pairs the run's length filter (`data.filters.PairFilter`) left out, in either on_bad_row mode."""
    truncated: int
    """Kept pairs cut to fit max_length."""
    fingerprint: str
    """`dataset_fingerprint` of the returned dataset."""
    source_sha256: str | None = None
    """sha256 of the source's bytes (`sources.content_sha256`); None for a hub dataset."""
    skipped_rows: list[SkippedRow] = field(default_factory=list)
    """Bad rows and duplicates, in row order, as written to skipped_rows.jsonl."""
    report_path: str | None = None


def load_preference_dataset(cfg, tokenizer, *, run_dir: str | Path | None = None, pair_filter=None):
    """Load `cfg.path` (a `DataConfig`), tokenise it once, return `(dataset, DataReport)`.

    `pair_filter` (`data.filters.PairFilter`, from `pair_filter_for(run config)`) drops pairs by their
    lengths before truncation; each is listed in the skip report with its reason.

    The dataset has columns example_id, prompt_ids, chosen_ids, rejected_ids, in source order.
    With `run_dir`, `skipped_rows.jsonl` is written there (empty when nothing was left out).
    Raises `DataError` for unreadable sources, bad rows under on_bad_row=error, over-long pairs
    under truncation=error, and more bad rows than max_skip_fraction under on_bad_row=skip.
    """
    _check_config(cfg, tokenizer)
    raw, src = load_rows(cfg.path, cfg.format, split=cfg.split, cache_dir=cfg.cache_dir)
    _check_columns(raw, src.path, tokenizer)
    settings = rows.Settings(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                             truncation=cfg.truncation, eos_at_cut=cfg.eos_at_cut)
    key = rows.settings_key(tokenizer, settings)
    # The source's bytes, not datasets' fingerprint: that one keys a local file on path + mtime.
    source_key = src.sha256 or raw._fingerprint
    # a save_to_disk DatasetDict's bytes cover every split: the split read is part of the key
    split = {"split": cfg.split} if src.format == "disk" else {}
    fp = hashlib.sha256(json.dumps({"source": source_key, **split, **key}, sort_keys=True).encode())
    # One place for every source (a save_to_disk directory may be read-only or shared).
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    cache_file = root / "sparsepo_tokenised" / f"{fp.hexdigest()[:32]}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tok = raw.map(rows.tokenise_batch, batched=True,
                  fn_kwargs={"tokenizer": tokenizer, "settings": settings},
                  remove_columns=raw.column_names, features=OUTPUT_FEATURES,
                  new_fingerprint=fp.hexdigest()[:32],
                  cache_file_name=str(cache_file),
                  load_from_cache_file=True, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                  desc="tokenising preference pairs")

    col = {c: tok.data.column(c).to_pylist() for c in ("example_id", *_WORK_COLUMNS)}
    n = len(tok)
    over = [i for i in range(n) if col["overlong"][i]]
    if over:
        i = over[0]
        raise DataError(f"{src.path}: {src.where(i)}: {col['overlong'][i]} ({len(over)} such pair(s) "
                        f"in all); raise data.max_length or set data.truncation=prompt_first or "
                        f"response_only")
    bad = [i for i in range(n) if col["bad_field"][i]]
    if bad and cfg.on_bad_row == "error":
        i = bad[0]
        more = f" ({len(bad) - 1} more bad row(s) after it)" if len(bad) > 1 else ""
        raise DataError(f"{src.path}: {src.where(i)}: field {col['bad_field'][i]!r}: "
                        f"{col['bad_reason'][i]}{more}; fix the data, or set data.on_bad_row=skip "
                        f"to skip bad rows and list them in {SKIP_REPORT}")
    records = {i: SkippedRow(src.row_number(i), col["bad_field"][i], col["bad_reason"][i]) for i in bad}
    keep, first_of, dups, filtered = [], {}, 0, 0
    for i in range(n):
        if col["bad_field"][i]:
            continue
        why = pair_filter.reason(**{k: col[k][i] for k in _LENGTHS}) if pair_filter is not None else None
        if why is not None:
            filtered += 1
            records[i] = SkippedRow(src.row_number(i), *why)
            continue
        first = first_of.setdefault(col["example_id"][i], i)
        if first == i:
            keep.append(i)
        else:  # identical pairs would share a reference-cache entry: keep one
            dups += 1
            records[i] = SkippedRow(src.row_number(i), "pair", f"duplicate of {src.where(first)} "
                                                               f"(example_id {col['example_id'][i]})")
    skipped_rows = [records[i] for i in sorted(records)]
    report_path = str(write_skip_report(skipped_rows, run_dir)) if run_dir is not None else None
    truncated = sum(col["truncated"][i] for i in keep)
    log.info("%s: %d rows, %d kept, %d skipped, %d duplicates, %d filtered, %d truncated to max_length=%d",
             src.path, n, len(keep), len(bad), dups, filtered, truncated, cfg.max_length)
    if bad or dups or filtered:
        log.warning("%s: %d bad rows, %d duplicates and %d filtered pairs left out; listed in %s", src.path,
                    len(bad), dups, filtered, report_path or "DataReport.skipped_rows (pass run_dir for a file)")
    if len(bad) > cfg.max_skip_fraction * n:
        raise DataError(f"{src.path}: {len(bad)} of {n} rows are bad ({len(bad) / n:.2%}), more than "
                        f"data.max_skip_fraction={cfg.max_skip_fraction}; see "
                        f"{report_path or 'the skipped rows (pass run_dir)'}, fix the data or raise "
                        f"data.max_skip_fraction")
    if not keep:
        raise DataError(f"{src.path}: no usable rows left")
    ds = tok if len(keep) == n else tok.select(keep, keep_in_memory=True)
    ds = ds.remove_columns(_WORK_COLUMNS)
    ds.info.description = _SETTINGS_TAG + json.dumps(key, sort_keys=True)
    report = DataReport(source=src.path, format=src.format, rows=n, kept=len(keep), skipped=len(bad),
                        duplicates=dups, filtered=filtered, truncated=truncated, fingerprint=dataset_fingerprint(ds),
                        source_sha256=src.sha256,
                        skipped_rows=skipped_rows, report_path=report_path)
    return ds, report


def holdout_split(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held out): round(fraction·N) pairs (at least 1, at most N − 1) drawn with `seed`, both
    parts in source order; each keeps the tokenisation settings, so each has its own fingerprint."""
    n = len(ds)
    if n < 2:
        raise DataError(f"eval.fraction={fraction}: {n} pair(s) cannot be split into training and held-out pairs")
    k = min(max(1, round(fraction * n)), n - 1)
    import numpy as np

    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:k]] = True
    return ds.select(np.flatnonzero(~held), keep_in_memory=True), ds.select(np.flatnonzero(held), keep_in_memory=True)


def dataset_fingerprint(ds: datasets.Dataset) -> str:
    """sha256 over the tokenisation settings and the ordered example ids: the reference cache key."""
    desc = ds.info.description or ""
    if not desc.startswith(_SETTINGS_TAG):
        raise DataError("dataset_fingerprint needs a dataset returned by load_preference_dataset "
                        "(its tokenisation settings travel in ds.info.description)")
    h = hashlib.sha256(desc[len(_SETTINGS_TAG):].encode())
    for eid in ds.with_format("arrow", columns=["example_id"])[:]["example_id"].to_pylist():
        h.update(b"\n" + eid.encode())
    return h.hexdigest()


def write_skip_report(records: list[SkippedRow], run_dir: str | Path) -> Path:
    """Write `run_dir/skipped_rows.jsonl` atomically: one {"row", "field", "reason"} per line."""
    return atomic_write(Path(run_dir) / SKIP_REPORT,
                        "".join(json.dumps(r._asdict(), ensure_ascii=False) + "\n" for r in records))


def _check_config(cfg, tokenizer) -> None:
    if cfg.truncation not in rows.TRUNCATION_MODES:
        raise DataError(f"data.truncation={cfg.truncation!r} is not one of {', '.join(rows.TRUNCATION_MODES)}")
    if cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row={cfg.on_bad_row!r} is not one of error, skip")
    if cfg.max_length < 2:
        raise DataError(f"data.max_length={cfg.max_length} leaves no room for prompt and response")
    if cfg.truncation == "prompt_first" and not 1 <= cfg.max_prompt_length < cfg.max_length:
        raise DataError(f"data.max_prompt_length={cfg.max_prompt_length} must be at least 1 and below "
                        f"data.max_length={cfg.max_length} (truncation=prompt_first)")
    if not 0 <= cfg.max_skip_fraction <= 1:
        raise DataError(f"data.max_skip_fraction={cfg.max_skip_fraction} must lie in [0, 1]")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, and every response ends with one; set "
                        "tokenizer.eos_token")


def _check_columns(raw: datasets.Dataset, path: str, tokenizer) -> None:
    cols = raw.column_names
    chatty = {c for c in ("prompt", "chosen", "rejected") if c in cols
              and isinstance(raw.features[c], (datasets.List, datasets.LargeList, datasets.Json))}
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found columns {cols}; expected "
                        f"'prompt', 'chosen', 'rejected' (strings, or lists of {{role, content}} "
                        f"messages), or 'chosen' and 'rejected' alone, sharing their prompt (TRL's implicit prompt)")
    if any(isinstance(raw.features[c], (datasets.List, datasets.LargeList)) for c in chatty) \
            and not tokenizer.chat_template:
        raise DataError(f"{path}: the pairs are chat messages, but the tokenizer has no chat "
                        f"template; set data.chat_template (a Jinja file or string), use a tokenizer "
                        f"that has one, or give prompt/chosen/rejected as strings")
