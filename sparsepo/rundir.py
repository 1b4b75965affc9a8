"""The run directory: never silently overwrite a finished run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from sparsepo.config import RunConfig, save_resolved


class RunDirError(RuntimeError):
    """The run directory holds a finished run and would be overwritten."""


def prepare_run_dir(cfg: RunConfig, *, is_main: bool) -> Path:
    """Refuse to overwrite a finished run silently; with logging.overwrite, clear the old run's
    outputs (the reference cache stays: it is verified by fingerprint and costly to rebuild).
    Precompute only (re)writes the cache, so it may run in any run directory."""
    run_dir = Path(cfg.logging.output_dir)
    done = run_dir / "summary.json"
    resuming = cfg.checkpoint.resume is not None or cfg.reference.mode == "precompute"
    if done.exists() and not cfg.logging.overwrite and not resuming:
        raise RunDirError(f"{run_dir} already holds a finished run ({done}); choose another "
                          f"logging.output_dir, set logging.overwrite=true to replace it, or "
                          f"checkpoint.resume=auto to continue it")
    if is_main:
        if cfg.logging.overwrite and not resuming and run_dir.is_dir():
            for name in ("checkpoints", "tensorboard", "final", "summary.json", "skipped_rows.jsonl"):
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
    dist.barrier()
    return run_dir
