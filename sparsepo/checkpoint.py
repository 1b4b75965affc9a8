"""Sharded checkpoints that resume exactly, and never leave a broken "latest".

    <run>/checkpoints/step-00000020/      DeepSpeed's ZeRO-3 shards (one set per rank)
                      rng-rank{r}.pt      each rank's RNG states
                      sparsepo.json       written last by rank 0: step, samples seen, world size,
                                          config + data fingerprints, and every file with its size
    <run>/checkpoints/latest              the newest complete tag (atomic rename)

A checkpoint without sparsepo.json, or whose files do not match the sizes recorded there, is not
valid: `checkpoint.resume=auto` falls back to the newest valid one and says so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sparsepo import engine as eng
from sparsepo.config import RunConfig, to_dict

log = logging.getLogger("sparsepo")
META = "sparsepo.json"
# Sections / keys that may change between the interrupted run and its resume.
_MAY_DIFFER = {"logging", "checkpoint"}
_MAY_DIFFER_KEYS = {("train", "max_steps"), ("train", "epochs"), ("reference", "timeout_s"),
                    ("reference", "window"), ("data", "num_proc"), ("data", "cache_dir")}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what differs and what to do."""


def root(cfg: RunConfig) -> Path:
    return Path(cfg.logging.output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def due(cfg: RunConfig, step: int, total: int) -> bool:
    every = cfg.checkpoint.every_steps
    return step == total or (every > 0 and step % every == 0)


def comparable(cfg_dict: dict) -> dict:
    return {s: {k: v for k, v in body.items() if (s, k) not in _MAY_DIFFER_KEYS}
            for s, body in cfg_dict.items() if s not in _MAY_DIFFER}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def is_valid(tag_dir: Path) -> tuple[bool, str]:
    meta_path = tag_dir / META
    if not meta_path.is_file():
        return False, f"{meta_path.name} missing (interrupted while saving)"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False, f"{meta_path} is damaged"
    for rel, size in meta["files"].items():
        path = tag_dir / rel
        if not path.is_file():
            return False, f"{rel} missing"
        if path.stat().st_size != size:
            return False, f"{rel} has {path.stat().st_size} bytes, {size} recorded (truncated or modified)"
    return True, ""


def list_tags(ckpt_root: Path) -> list[Path]:
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith("_universal"))


def find_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint directory to resume from, or None to start fresh."""
    want = cfg.checkpoint.resume
    ckpt_root = root(cfg)
    if want is None:
        if ckpt_root.is_dir() and list_tags(ckpt_root) and not cfg.logging.overwrite:
            raise CheckpointError(
                f"{ckpt_root} already holds checkpoints. Continue that run with checkpoint.resume=auto "
                f"(or --resume auto), or start over with logging.overwrite=true or another logging.output_dir.")
        return None
    if want != "auto":
        path = Path(want)
        ok, why = is_valid(path)
        if not ok:
            raise CheckpointError(f"cannot resume from {path}: {why}")
        return path
    for tag_dir in reversed(list_tags(ckpt_root)):
        ok, why = is_valid(tag_dir)
        if ok:
            return tag_dir
        log.warning("skipping checkpoint %s: %s; trying an older one", tag_dir, why)
    return None


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, cfg: RunConfig, run_dir: Path, *, step: int, samples: int, data_fingerprint: str, ctx) -> Path:
    ckpt_root = root(cfg)
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    if ctx.is_main and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover of an interrupted save of this same step
    dist.barrier()
    eng.save_checkpoint(engine, ckpt_root, tag, client_state={"step": step, "samples": samples})
    torch.save(_rng_state(), tag_dir / f"rng-rank{ctx.rank}.pt")
    dist.barrier()
    if ctx.is_main:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
                 if p.is_file() and p.name != META}
        meta = {"step": step, "samples": samples, "world_size": ctx.world_size, "data": data_fingerprint,
                "config": to_dict(cfg), "files": files}
        _atomic_write(tag_dir / META, json.dumps(meta, indent=1, default=str))
        _atomic_write(ckpt_root / "latest", tag)
        for old in list_tags(ckpt_root)[:-cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)
    dist.barrier()
    return tag_dir


def _to_universal(tag_dir: Path, *, is_main: bool) -> Path:
    """Convert a ZeRO checkpoint for loading on another world size (DeepSpeed's ds_to_universal)."""
    out = tag_dir.with_name(tag_dir.name + "_universal")
    if is_main and not (out / "zero").is_dir():
        import subprocess
        import sys

        log.info("world size changed: converting %s to a universal checkpoint", tag_dir)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(tag_dir), "--output_folder", str(out), "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], check=True)
    dist.barrier()
    return out


def restore(engine, tag_dir: Path, cfg: RunConfig, *, data_fingerprint: str, ctx) -> int:
    """Load engine state and RNG; returns the optimiser step to continue from."""
    meta = json.loads((tag_dir / META).read_text())
    now, then = comparable(to_dict(cfg)), comparable(meta["config"])
    differ = [f"{s}.{k}: {then.get(s, {}).get(k)!r} -> {body[k]!r}" for s, body in now.items() for k in body
              if then.get(s, {}).get(k) != body[k]]
    if differ:
        raise CheckpointError(f"checkpoint {tag_dir} was written by a different config: {'; '.join(differ)}. "
                              f"Resume with the original settings, or start a new run directory.")
    if meta["data"] != data_fingerprint:
        raise CheckpointError(f"checkpoint {tag_dir} was trained on different data (fingerprint "
                              f"{meta['data']} vs {data_fingerprint}); resume with the original dataset.")
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * ctx.world_size
    if meta["samples"] % global_batch:
        raise CheckpointError(
            f"checkpoint {tag_dir} stopped after {meta['samples']} samples, not a whole number of global "
            f"batches of {global_batch} on {ctx.world_size} rank(s); choose micro_batch_size x grad_accum x "
            f"ranks dividing {meta['samples']}.")
    if meta["world_size"] == ctx.world_size:
        eng.load_checkpoint(engine, tag_dir.parent, tag_dir.name)
        _set_rng_state(torch.load(tag_dir / f"rng-rank{ctx.rank}.pt", weights_only=False))
    else:
        universal = _to_universal(tag_dir, is_main=ctx.is_main)
        eng.load_checkpoint(engine, universal.parent, universal.name, universal=True)
    step = meta["samples"] // global_batch
    if ctx.is_main:
        log.info("resumed from %s: %d samples seen, continuing at step %d", tag_dir, meta["samples"], step)
    return step
