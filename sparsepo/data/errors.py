"""The error and the skip record shared by the data modules."""

from __future__ import annotations

from typing import NamedTuple


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file, the row (or line) and the fix."""


class SkippedRow(NamedTuple):
    """One row left out of training, as written to `skipped_rows.jsonl`.

    `row` is 1-based: the line number for JSON Lines files, the record number otherwise.
    """

    row: int
    field: str
    reason: str
