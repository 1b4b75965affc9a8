"""Content hashing, streamed: one place for "the sha256 of these bytes on disk" (checkpoint files,
data sources, model and tokenizer files of the reference-cache key)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def update_with_file(h, path: str | Path, *, chunk: int = CHUNK) -> None:
    """Feed a file's bytes into hash object `h`, without reading it whole."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    update_with_file(h, path)
    return h.hexdigest()
