"""Read preference rows into an Arrow-backed `datasets.Dataset`, refusing unreadable sources clearly.

Accepted: .jsonl/.ndjson, .json (an array of objects, or JSON Lines), .parquet, .csv, a
`save_to_disk` directory (a Dataset, or a DatasetDict from which `split` is taken), or a hub name —
tried only when the path does not exist locally, format is auto/hub, and the path looks like a hub
name rather than a file. Errors name the file and, where the reader allows, the line.

A local source is identified by its bytes (`content_sha256`), never by path + mtime: `datasets`
keys its cached copy of a data file on path + mtime, and `cp -p`, `rsync -a`, `tar x` keep the
mtime of a file they change. Each content therefore gets its own `datasets` cache directory
(<cache>/sparsepo_sources/<sha256>), so a changed file is always read afresh.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa

from sparsepo.data.errors import DataError
from sparsepo.hashing import update_with_file
from sparsepo.data.rows import undecodable

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "disk", "hub")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
               ".pq": "parquet", ".csv": "csv"}
_NAMES = {"jsonl": "JSON Lines", "json": "JSON", "parquet": "Parquet", "csv": "CSV"}


@dataclass
class Source:
    """Where the rows came from, and how messages name a row."""

    path: str
    format: str
    """Resolved format: jsonl | json | parquet | csv | disk | hub."""
    by_line: bool = False
    """Rows are JSON Lines records: messages give the file's line number."""
    sha256: str | None = None
    """`content_sha256` of a local source (None for a hub dataset)."""
    _lines: list[int] | None = field(default=None, repr=False)

    def row_number(self, index: int) -> int:
        """1-based number of 0-based record `index`: its line in a JSON Lines file, else index + 1."""
        if not self.by_line:
            return index + 1
        if self._lines is None:  # blank lines hold no record, so count them only when asked
            with open(self.path, "rb") as f:
                self._lines = [n for n, raw in enumerate(f, 1) if raw.strip()]
        return self._lines[index] if index < len(self._lines) else index + 1

    def where(self, index: int) -> str:
        return f"{'line' if self.by_line else 'row'} {self.row_number(index)}"


def resolve_format(path: str, fmt: str) -> str:
    """The concrete format of `path`; `auto` decides from the extension or a directory."""
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "hub":
        return fmt
    p = Path(path).expanduser()
    if not p.exists():
        if fmt == "auto" and _looks_like_hub_name(path):
            return "hub"
        raise DataError(f"{path}: no such file or directory (data.path)")
    if fmt == "disk" and not p.is_dir():
        raise DataError(f"{path}: data.format=disk needs a save_to_disk directory, this is a file")
    if fmt != "auto":
        if p.is_dir() and fmt != "disk":
            raise DataError(f"{path}: a directory, but data.format={fmt}; use data.format=disk or a file")
        return fmt
    if p.is_dir():
        return "disk"
    ext = p.suffix.lower()
    if ext not in _EXTENSIONS:
        raise DataError(f"{path}: cannot tell the format from the extension {ext!r}; "
                        f"set data.format to one of jsonl, json, parquet, csv")
    return _EXTENSIONS[ext]


def _looks_like_hub_name(path: str) -> bool:
    # "org/name" or "name"; anything with a data-file extension or a relative/absolute prefix is local.
    return (re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", path) is not None
            and Path(path).suffix.lower() not in _EXTENSIONS)


def load_rows(path: str, fmt: str, *, split: str = "train",
              cache_dir: str | None = None) -> tuple[datasets.Dataset, Source]:
    """Load the raw rows (no validation yet) and describe their source."""
    fmt = resolve_format(path, fmt)
    if fmt == "hub":
        source = Source(path, fmt)
        try:
            ds = datasets.load_dataset(path, split=split, cache_dir=cache_dir)
        except Exception as e:
            raise DataError(f"{path}: not found locally, and loading it as a hub dataset (split "
                            f"{split!r}) failed: {type(e).__name__}: {e}. Check data.path and "
                            f"data.split") from e
    elif fmt == "disk":
        p = Path(path).expanduser()
        source = Source(str(p), fmt, sha256=content_sha256(p))
        ds = _load_disk(p, split)
    else:
        p = Path(path).expanduser()
        if fmt != "parquet" and _is_blank(p):  # the readers fail on these with StopIteration or "no data"
            raise DataError(f"data file {p} has no rows (it is empty or holds only blank lines); "
                            f"point data.path at a file of preference rows")
        by_line = fmt == "jsonl" or (fmt == "json" and not _is_json_array(p))
        source = Source(str(p), fmt, by_line=by_line, sha256=content_sha256(p))
        base = Path(cache_dir).expanduser() if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
        ds = _load_file(p, fmt, by_line, str(base / "sparsepo_sources" / source.sha256[:32]))
    if len(ds) == 0:
        raise DataError(f"data file {source.path} has no rows" if fmt != "hub"
                        else f"{source.path}: split {split!r} holds no rows")
    _check_utf8(ds, source)
    return ds, source


def content_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 of a data file's bytes (streamed), or of a save_to_disk directory's files: each file's
    path relative to the directory and its bytes, in sorted order (so a renamed shard counts too)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if f is not p:
            h.update(b"\0" + str(f.relative_to(p)).encode() + b"\0")
        update_with_file(h, f, chunk=chunk)
    return h.hexdigest()


def _check_utf8(ds: datasets.Dataset, source: Source) -> None:
    # Arrow's JSON and CSV readers can store invalid UTF-8 that only fails when a row is read.
    for name in ds.column_names:
        offset = 0
        for chunk in ds.data.column(name).chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as e:
                detail = _diagnose(Path(source.path), source.format, source.by_line) \
                    if source.format in _NAMES else None
                m = re.search(r"Invalid UTF8 sequence at string index (\d+)", str(e))
                flat = pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)
                where = f"{source.where(offset + int(m.group(1)))}: " if m and flat else ""
                raise DataError(detail or f"{source.path}: {where}field {name!r}: not valid UTF-8 "
                                          f"({e})") from e
            offset += len(chunk)


def _load_disk(p: Path, split: str) -> datasets.Dataset:
    if not (p / "state.json").exists() and not (p / "dataset_dict.json").exists():
        raise DataError(f"{p}: a directory, but not one written by save_to_disk (no state.json or "
                        f"dataset_dict.json); point data.path at a data file")
    try:
        obj = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"{p}: could not be read as a save_to_disk directory: {e}") from e
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{p}: a DatasetDict with splits {sorted(obj)}, none named {split!r}; "
                            f"set data.split (or eval.split, for held-out pairs) to one of them")
        obj = obj[split]
    return obj


def _load_file(p: Path, fmt: str, by_line: bool, cache_dir: str | None) -> datasets.Dataset:
    kwargs = {}
    if fmt == "csv":
        # All text, and "NA"/"None"/"null" stay text: pandas would otherwise turn them into missing
        # values and "1" into an integer.
        header = _csv_header(p)
        if header is not None:
            kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                      "keep_default_na": False}
    builder = "json" if fmt == "jsonl" else fmt
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache_dir,
                                     **kwargs)
    except Exception as e:
        cause = e.__cause__ or e
        if "corresponds to no data" in str(cause):  # datasets' words for a header-only CSV or `[]`
            raise DataError(f"data file {p} has no rows; point data.path at a file of preference rows") from e
        detail = _diagnose(p, fmt, by_line)
        raise DataError(detail or f"{p}: could not be read as {_NAMES[fmt]} "
                                  f"({type(cause).__name__}: {cause}); is it really a "
                                  f"{_NAMES[fmt]} file?") from e


def _csv_header(p: Path) -> list[str] | None:
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error):
        return None  # the load fails and _diagnose names the line
    if not header:
        raise DataError(f"{p}: empty CSV file (expected a header row naming the columns)")
    return header


def _is_blank(p: Path, *, chunk: int = 1 << 20) -> bool:
    """True when the file holds nothing but whitespace (and a UTF-8 byte-order mark)."""
    with open(p, "rb") as f:
        first = True
        while block := f.read(chunk):
            if first:
                block, first = block.removeprefix(b"\xef\xbb\xbf"), False
            if block.strip():
                return False
    return True


def _is_json_array(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _diagnose(p: Path, fmt: str, by_line: bool) -> str | None:
    """Find the first line/record that made the reader fail, or None when it is none of ours."""
    if fmt == "parquet":
        return None
    if fmt == "json" and not by_line:
        return _diagnose_json_array(p)
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{p}: line {n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1}); is it really a {_NAMES[fmt]} file?")
            if fmt == "csv" or not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                return f"{p}: line {n}: not valid JSON ({e.msg} at column {e.colno})"
            problem = _record_problem(obj)
            if problem:
                return f"{p}: line {n}: {problem}"
    return None


def _diagnose_json_array(p: Path) -> str | None:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return f"{p}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"{p}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, list):
        return f"{p}: expected a JSON array of objects (or JSON Lines), got a JSON {type(obj).__name__}"
    for i, record in enumerate(obj, 1):
        problem = _record_problem(record)
        if problem:
            return f"{p}: row {i}: {problem}"
    return None


def _record_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key, value in obj.items():
        bad = _undecodable_in(value)
        if bad:
            return f"field {key!r}: {bad}"
    return None


def _undecodable_in(value) -> str | None:
    if isinstance(value, str):
        return undecodable(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for v in items:
        bad = _undecodable_in(v)
        if bad:
            return bad
    return None
