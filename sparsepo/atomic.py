"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every file sparsepo writes for others to trust (cache shards and index, checkpoint metadata,
resolved configs, reports, the demo world's marker) goes through `atomic_write`. The file gets the
mode a plain `open(path, "w")` would give it (0666 minus the umask; an existing file keeps its own),
not mkstemp's 0600, so teammates can read a shared cache.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write that ran out of space: names the file, the bytes needed and free, and says that
    nothing was published."""


def disk_full(path: str | Path, needed: int | None, err: OSError) -> DiskFull:
    path = Path(path)
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    need = f"{needed} bytes needed, " if needed is not None else ""
    return DiskFull(err.errno, f"could not write {path}: {err.strerror} ({need}{free} bytes free in {path.parent}); "
                               f"nothing was published (no partial file left)")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets as it reads,
    which would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`. A full
    disk raises `DiskFull` naming the file and the space; the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in FULL and not isinstance(e, DiskFull):
            raise disk_full(path, len(payload), e) from e
        raise
    return path
