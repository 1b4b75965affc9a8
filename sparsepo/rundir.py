"""The run directory: refuse to overwrite a finished run, and let one writer in at a time.

    run_dir = prepare_run_dir(cfg, is_main=ctx.is_main)   # every rank; rank 0 takes <run>/.lock
    ...                                                   # the run (training or precompute)
    release_run_dir(run_dir)                              # or the process ends: flock dies with it

Two runs pointed at one logging.output_dir would delete each other's checkpoints and interleave
their TensorBoard files while both report success. Rank 0 therefore holds an exclusive, non-blocking
`fcntl.flock` on <run>/.lock for the run's whole life; the file says who holds it (host, pid, start
time). A second writer is refused before it touches anything, with a message naming the holder. The
kernel drops the lock when its process ends, however it ends, so a lock file left by a crashed run
is no conflict: it is reported as stale (info) and taken over. The file is never deleted (deleting a
lock file races with a process that has just opened it); release empties it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path


from sparsepo.config import RunConfig, save_resolved
from sparsepo.engine.collectives import barrier, on_one_rank

log = logging.getLogger("sparsepo")
LOCK = ".lock"


class RunDirError(RuntimeError):
    """The run directory holds a finished run, or another run is writing it."""


_HELD: dict[Path, int] = {}
"""Run directories this process holds: resolved path -> the locked file descriptor."""


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"holder unknown ({text.strip()[:200]!r})" if text.strip() else "holder unknown"


def acquire_run_lock(run_dir: str | Path, *, setting: str = "logging.output_dir") -> Path:
    """Take <run_dir>/.lock (creating run_dir); raise RunDirError naming the holder (and `setting`, the
    setting that chose the directory) if another process has it. Re-entrant within one process.
    Returns the lock file's path. The reference cache directory is locked the same way while written."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    path = run_dir / LOCK
    if key in _HELD:
        return path
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by another run ({holder}; lock {path}). Wait for it to "
                          f"finish, stop it, or choose another {setting}") from None
    except BaseException:
        os.close(fd)
        raise
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    if previous.strip():
        log.info("stale lock %s left by a run that has ended (%s): taking it over", path, _describe(previous))
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    _HELD[key] = fd
    return path


def release_run_dir(run_dir: str | Path) -> None:
    """Empty and unlock <run_dir>/.lock if this process holds it (a no-op otherwise)."""
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def prepare_run_dir(cfg: RunConfig, *, is_main: bool) -> Path:
    """Refuse to overwrite a finished run silently; take the run directory's lock (rank 0, held
    until `release_run_dir` or the process ends); with logging.overwrite, clear the old run's
    outputs (the reference cache stays: it is verified by fingerprint and costly to rebuild).
    Precompute only (re)writes the cache, so it may run in any run directory (it is locked too).
    Collective when a process group is initialised: a refusal on rank 0 is raised on every rank."""
    run_dir = Path(cfg.logging.output_dir)
    done = run_dir / "summary.json"
    resuming = cfg.checkpoint.resume is not None or cfg.reference.mode == "precompute"
    if done.exists() and not cfg.logging.overwrite and not resuming:
        raise RunDirError(f"{run_dir} already holds a finished run ({done}); choose another "
                          f"logging.output_dir, set logging.overwrite=true to replace it, or "
                          f"checkpoint.resume=auto to continue it")
    on_one_rank(lambda: acquire_run_lock(run_dir))  # before anything below touches the directory
    if is_main:
        if cfg.logging.overwrite and not resuming and run_dir.is_dir():
            for name in ("checkpoints", "tensorboard", "final", "summary.json", "skipped_rows.jsonl", "metrics.jsonl"):
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
    barrier()
    return run_dir
