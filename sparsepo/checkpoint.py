"""Sharded checkpoints that resume exactly, and never leave a broken "latest".

    <run>/checkpoints/step-00000020/      DeepSpeed's ZeRO-3 shards (one set per rank)
                      rng-rank{r}.pt      each rank's RNG states
                      samples-rank{r}.pt  SPO: each rank's in-flight policy samples (PolicySamples.state_dict)
                      sparsepo.json       written last by rank 0: step, samples seen, world size,
                                          config + data fingerprints, and every file with its size
                                          ("files") and sha256 ("sha256")
    <run>/checkpoints/latest              the newest complete tag (atomic rename)
    <run>/checkpoints/step-00000020_universal/
                                          made on demand when resuming on another world size
                                          (DeepSpeed's ds_to_universal), reused while its source
                                          is unchanged

A checkpoint without sparsepo.json, or whose files do not match the sizes and sha256s recorded
there, is not valid: `checkpoint.resume=auto` falls back to the newest valid one and says so (naming
the file that failed), an explicitly named one is refused. Hashing is shared out: the file whose name
carries rank r (`*_rank_{r}_*`, `rng-rank{r}.pt`) is hashed by rank r % world size, files without a
rank by rank 0, and the verdicts are gathered, so every rank reaches the same decision. A checkpoint
written before sha256s were recorded is checked by size only, with a warning.

What may change between the interrupted run and its resume: the logging and checkpoint sections,
the run length (train.max_steps / train.epochs), where the data and the reference cache live
(the data itself is checked by fingerprint), and how the global batch is split
(micro_batch_size x grad_accum x ranks), as long as the global batch stays the same. Changing the
run length with a non-constant LR schedule (or optim.warmup_ratio) is allowed but not exact: the
scheduler's position is restored (transformers' LambdaLR keeps no closure state), and its curve is
the new total's from the first resumed step on (`PolicyEngine.apply_schedule` resets the rate the
optimiser state carried over; one warning says so). Constant with warmup_steps does not depend on
the total.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from typing import NamedTuple
from pathlib import Path

import torch
import torch.distributed as dist

from sparsepo import rng_state
from sparsepo.engine.collectives import gather, is_multi, on_every_rank, on_one_rank
from sparsepo.atomic import FULL, atomic_write
from sparsepo.checkpoint_integrity import META, is_valid, owner, seal, verify  # noqa: F401  (is_valid: API)
from sparsepo.hashing import sha256_file
from sparsepo.checkpoint_config import config_differences
from sparsepo.config import RunConfig, to_dict
from sparsepo.config.ds_json import schedule_depends_on_length

log = logging.getLogger("sparsepo")
UNIVERSAL_SOURCE = "sparsepo-universal-source.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what differs and what to do."""


def root(cfg: RunConfig) -> Path:
    return Path(cfg.logging.output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag_dir: Path) -> int | None:
    try:
        return int(tag_dir.name.removeprefix("step-"))
    except ValueError:
        return None


def due(cfg: RunConfig, step: int, total: int) -> bool:
    every = cfg.checkpoint.every_steps
    return (step == total and cfg.checkpoint.at_end) or (every > 0 and step % every == 0)


def read_meta(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / META).read_text())


def list_tags(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories under `ckpt_root` (valid or not), oldest first."""
    tags = [p for p in Path(ckpt_root).glob("step-*") if p.is_dir() and step_of(p) is not None]
    return sorted(tags, key=step_of)


class _Plan(NamedTuple):
    """Which checkpoints to try, newest first: one named explicitly (refused if invalid), or those of
    a checkpoints/ directory (kind "run": one must be valid; "auto": none is fine)."""

    kind: str
    path: str
    root: str
    candidates: list[str]


def _plan_path(path: Path) -> _Plan:
    if not (path / META).exists():
        for candidate_root in (path / "checkpoints", path):
            tags = list_tags(candidate_root)
            if tags:
                return _Plan("run", str(path), str(candidate_root), [str(t) for t in reversed(tags)])
    return _Plan("explicit", str(path), str(path), [str(path)])


def _plan(cfg: RunConfig) -> _Plan | None:
    want = cfg.checkpoint.resume
    ckpt_root = root(cfg)
    if want is None:
        if ckpt_root.is_dir() and list_tags(ckpt_root) and not cfg.logging.overwrite:
            raise CheckpointError(
                f"{ckpt_root} already holds checkpoints. Continue that run with checkpoint.resume=auto "
                f"(or --resume auto), or start over with logging.overwrite=true or another logging.output_dir.")
        return None
    if want != "auto":
        return _plan_path(Path(want))
    return _Plan("auto", str(ckpt_root), str(ckpt_root), [str(t) for t in reversed(list_tags(ckpt_root))])


def _pick(plan: _Plan | None, check, *, action: str = "resume from", talk: bool = True) -> Path | None:
    """The first candidate of `plan` that `check` passes; `talk`: log (rank 0)."""
    if plan is None:
        return None
    for candidate in plan.candidates:
        ok, why = check(Path(candidate))
        if ok:
            return Path(candidate)
        if plan.kind == "explicit":
            raise CheckpointError(f"cannot {action} {candidate}: {why}. Name another checkpoint directory"
                                  + (", or use checkpoint.resume=auto to take the newest valid one."
                                     if action == "resume from" else "."))
        if talk:
            log.warning("skipping checkpoint %s: %s; trying an older one", candidate, why)
    if plan.kind == "run":
        raise CheckpointError(f"cannot {action} {plan.path}: no valid checkpoint in {plan.root}")
    if talk:
        if plan.candidates:
            log.warning("no valid checkpoint in %s: starting from scratch", plan.root)
        else:
            log.info("checkpoint.resume=auto: no checkpoint in %s yet, starting from scratch", plan.root)
    return None


def resolve(path: str | Path, *, action: str = "resume from") -> Path:
    """A valid checkpoint directory from what a user named: a checkpoint (must be valid), or a run
    directory / its checkpoints/ directory (its newest valid checkpoint). One process."""
    return _pick(_plan_path(Path(path)), is_valid, action=action)


def find_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint directory to resume from, or None to start fresh. In a distributed run rank 0
    decides which checkpoints to try, every rank hashes its share of each (`verify`), and all follow
    the same verdicts (so no two ranks can pick different checkpoints)."""
    if not is_multi():
        return _pick(_plan(cfg), is_valid)
    return _pick(on_one_rank(lambda: _plan(cfg)), verify, talk=dist.get_rank() == 0)


def _remove(tag_dir: Path) -> None:
    shutil.rmtree(tag_dir, ignore_errors=True)
    shutil.rmtree(tag_dir.with_name(tag_dir.name + "_universal"), ignore_errors=True)


SHORT_WRITE = ("unexpected pos", "file write failed", "No space left on device")  # torch's writer, libc


def is_disk_full(err: BaseException, free_bytes: int) -> bool:
    """Whether a failed save ran out of space: ENOSPC/EDQUOT, less than 1 MiB left, or torch's
    short-write error ("[enforce fail at inline_container.cc] unexpected pos", which has no errno)
    whatever is free by the time we look: a 15 GB ZeRO-2 optimiser file that did not fit says so
    even when a few GB remain (GPU issue 19)."""
    if getattr(err, "errno", None) in FULL or free_bytes < 1 << 20:
        return True
    return isinstance(err, RuntimeError) and any(sig in str(err) for sig in SHORT_WRITE)


def _write_shards(engine, tag_dir: Path, step: int, samples: int, rank: int, rank_state: dict) -> None:
    """This rank's DeepSpeed shards, RNG state and `rank_state` files. DeepSpeed reports a full disk as a
    torch serialisation error ("unexpected pos"): say what it is, and that the checkpoint stays unsealed."""
    try:
        engine.save(tag_dir.parent, tag_dir.name, client_state={"step": step, "samples": samples})
        torch.save(rng_state.capture(), tag_dir / f"rng-rank{rank}.pt")
        for name, state in rank_state.items():
            torch.save(state, tag_dir / f"{name}-rank{rank}.pt")
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(tag_dir.parent).free
        if not is_disk_full(e, free):
            raise
        raise CheckpointError(f"checkpoint {tag_dir} could not be written: the disk is full ({free} bytes free in "
                              f"{tag_dir.parent}); it is not sealed (no {META}), so no resume will use it. Free "
                              f"some space or point logging.output_dir at a larger disk.") from e


class Unsealed(NamedTuple):
    """A checkpoint whose files are being written in the background (checkpoint.async_write): sealed by
    `seal_written` once DeepSpeed has committed it (after the next optimiser step)."""
    tag_dir: Path
    step: int
    samples: int
    data_fingerprint: str
    num_tokens: float = 0.0


def save(engine, cfg: RunConfig, run_dir: Path, *, step: int, samples: int, data_fingerprint: str, ctx,
         rank_state: dict | None = None, wait: bool = True, num_tokens: float = 0.0) -> Path | Unsealed:
    """Write checkpoint `step` on every rank; rank 0 seals it with sparsepo.json, then points
    `latest` at it, then prunes. Killed at any moment, `latest` names a complete checkpoint.
    `rank_state`: {name: this rank's state} saved as {name}-rank{r}.pt (see `load_rank_state`).
    `num_tokens`: TRL's metric so far, recorded in sparsepo.json for the resume.
    `wait=False` with checkpoint.async_write: return at once, `Unsealed`; the caller seals it with
    `seal_written` after the next optimiser step (DeepSpeed commits the files at that step's boundary)."""
    started = time.perf_counter()
    ckpt_root = root(cfg)
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for old in list_tags(ckpt_root):
            if old.name == tag:  # a leftover of an interrupted save of this same step
                _remove(old)
            elif step_of(old) > step:  # an abandoned future (this run resumed from an older checkpoint)
                log.warning("removing checkpoint %s: this run resumed before it and is now at step %d", old, step)
                _remove(old)
    dist.barrier()
    on_every_rank(lambda: _write_shards(engine, tag_dir, step, samples, ctx.rank, rank_state or {}),
                  what=f"checkpoint {tag}")
    unsealed = Unsealed(tag_dir, step, samples, data_fingerprint, num_tokens)
    if not wait and cfg.checkpoint.async_write:
        if ctx.is_main:
            log.info("checkpoint %s: handed to the writer in %.2f s", tag, time.perf_counter() - started)
        return unsealed
    engine.commit_checkpoint()
    seal_written(unsealed, cfg, ctx)
    if ctx.is_main:
        log.info("checkpoint %s: written and sealed in %.2f s", tag, time.perf_counter() - started)
    return tag_dir


def seal_written(unsealed: Unsealed, cfg: RunConfig, ctx) -> Path:
    """Hash the written checkpoint (each rank the files it owns), write sparsepo.json, point `latest` at it
    and prune (rank 0). Its files must be complete: after `save`, or after the optimiser step that
    committed an async write."""
    tag_dir, ckpt_root = unsealed.tag_dir, unsealed.tag_dir.parent
    rels = [str(p.relative_to(tag_dir)) for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != META]
    # each rank hashes the files it owns (see `owner`), in parallel; rank 0 records them all
    mine = {rel: sha256_file(tag_dir / rel) for rel in rels if owner(rel, ctx.world_size) == ctx.rank}
    shares = gather(mine)
    if ctx.is_main:
        hashes = {rel: sha for share in shares for rel, sha in share.items()}
        files = {rel: (tag_dir / rel).stat().st_size for rel in rels}
        hashes = {rel: hashes.get(rel) or sha256_file(tag_dir / rel) for rel in rels}
        meta = {"step": unsealed.step, "samples": unsealed.samples, "world_size": ctx.world_size,
                "global_batch": cfg.train.micro_batch_size * cfg.train.grad_accum * ctx.world_size,
                "data": unsealed.data_fingerprint, "num_tokens": unsealed.num_tokens, "config": to_dict(cfg), "files": files,
                "sha256": dict(sorted(hashes.items()))}
        atomic_write(tag_dir / META, seal(meta))  # with the checksum of its own body
        atomic_write(ckpt_root / "latest", tag_dir.name)
        for old in list_tags(ckpt_root)[:-cfg.checkpoint.keep_last]:
            _remove(old)
    dist.barrier()
    return tag_dir


def _to_universal(tag_dir: Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint for loading on another world size (DeepSpeed's ds_to_universal),
    into `out` (on rank 0, the others wait for it); a conversion of the same source (same
    sparsepo.json) is reused."""
    source = {"source": str(Path(tag_dir).resolve()), "meta_sha256": sha256_file(tag_dir / META)}

    def convert() -> Path:
        marker = out / UNIVERSAL_SOURCE
        if (out / "zero").is_dir() and marker.is_file() and json.loads(marker.read_text()) == source:
            return out
        import subprocess
        import sys

        log.info("world size changed: converting %s to a universal checkpoint in %s", tag_dir, out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                               "--input_folder", str(tag_dir), "--output_folder", str(tmp),
                               "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed "
                                  f"(ds_to_universal exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                                  f"\n{proc.stderr[-3000:]}")
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's, not ours
        atomic_write(tmp / UNIVERSAL_SOURCE, json.dumps(source))
        tmp.replace(out)
        return out

    return on_one_rank(convert)


def check_compatible(tag_dir: Path, cfg: RunConfig, *, data_fingerprint: str, world_size: int) -> dict:
    """Refuse (CheckpointError naming what differs) a checkpoint this run cannot continue exactly;
    returns its metadata."""
    meta = read_meta(tag_dir)
    differ = config_differences(cfg, meta["config"])
    if differ:
        raise CheckpointError(f"checkpoint {tag_dir} was written by a different config: {'; '.join(differ)}. "
                              f"Resume with the original settings, or start a new run directory.")
    if meta["data"] != data_fingerprint:
        raise CheckpointError(f"checkpoint {tag_dir} was trained on different data (fingerprint "
                              f"{meta['data']} vs {data_fingerprint}); resume with the original dataset (and, for "
                              f"SPO, the original generation.prompts_path file).")
    old_train = meta["config"]["train"]
    old_global = meta.get("global_batch") or (old_train["micro_batch_size"] * old_train["grad_accum"]
                                              * meta["world_size"])
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    if global_batch != old_global:
        raise CheckpointError(
            f"checkpoint {tag_dir} was trained with a global batch of {old_global} pairs "
            f"({old_train['micro_batch_size']} x {old_train['grad_accum']} x {meta['world_size']} rank(s)); this run "
            f"has {cfg.train.micro_batch_size} x {cfg.train.grad_accum} x {world_size} = {global_batch}. Choose "
            f"train.micro_batch_size x train.grad_accum x ranks = {old_global} to continue the same run.")
    if meta["samples"] % global_batch:
        raise CheckpointError(
            f"checkpoint {tag_dir} stopped after {meta['samples']} samples, not a whole number of global "
            f"batches of {global_batch} on {world_size} rank(s); choose micro_batch_size x grad_accum x "
            f"ranks dividing {meta['samples']}.")
    return meta


def restore(engine, tag_dir: Path, cfg: RunConfig, *, data_fingerprint: str, ctx) -> int:
    """Load engine state and RNG; returns the optimiser step to continue from."""
    tag_dir = Path(tag_dir)
    meta = check_compatible(tag_dir, cfg, data_fingerprint=data_fingerprint, world_size=ctx.world_size)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * ctx.world_size
    if meta["world_size"] == ctx.world_size:
        client = engine.load(tag_dir.parent, tag_dir.name)
    else:
        universal = _to_universal(tag_dir, root(cfg) / (tag_dir.name + "_universal"))
        client = engine.load(universal.parent, universal.name, universal=True)
        if ctx.is_main:
            log.info("loaded %s (saved on %d rank(s)) on %d rank(s) through %s", tag_dir, meta["world_size"],
                     ctx.world_size, universal)
    if client.get("samples", meta["samples"]) != meta["samples"]:
        raise CheckpointError(f"checkpoint {tag_dir}: DeepSpeed's state says {client.get('samples')} samples, "
                              f"{META} says {meta['samples']}; the directory mixes two saves")
    # Every rank was seeded alike, so with another world size a new rank takes rank 0's state.
    rng = tag_dir / f"rng-rank{ctx.rank}.pt"
    rng_state.restore(rng_state.load(rng if rng.is_file() else tag_dir / "rng-rank0.pt"))
    step = meta["samples"] // global_batch
    if ctx.is_main:
        log.info("resumed from %s: %d samples seen, continuing at step %d", tag_dir, meta["samples"], step)
    old_train = meta["config"]["train"]
    if schedule_depends_on_length(cfg) and ((old_train.get("max_steps"), old_train.get("epochs"))
                                            != (cfg.train.max_steps, cfg.train.epochs)):
        engine.apply_schedule()  # the saved rate followed the old length's curve
        if ctx.is_main:
            log.warning("checkpoint %s was written by a run of train.max_steps=%s / epochs=%s, this one has %s / "
                        "%s: the %s LR schedule is recomputed for the new length and followed from step %d on "
                        "(lr %.3g); the steps before followed the old one's (an uninterrupted run of either length "
                        "differs)", tag_dir, old_train.get("max_steps"), old_train.get("epochs"), cfg.train.max_steps,
                        cfg.train.epochs, cfg.optim.schedule, step + 1, engine.lr())
    return step


def every_rank_state(tag_dir: Path, name: str):
    """(load, world): `load(r)` reads saved rank r's `name` state, for r < world (the checkpoint's world
    size) — for a resume on another world size that can re-cut them, reading only what it needs — or
    None when any rank's file is missing."""
    paths = [Path(tag_dir) / f"{name}-rank{r}.pt" for r in range(read_meta(Path(tag_dir))["world_size"])]
    if not all(p.is_file() for p in paths):
        return None
    return (lambda r: torch.load(paths[r], weights_only=True)), len(paths)


def load_rank_state(tag_dir: Path, name: str, *, rank: int, world_size: int):
    """This rank's `name` state saved by `save(rank_state=...)`, or None (with a warning saying the resume
    is not exact) when the checkpoint has none or was written on another world size."""
    meta, path = read_meta(Path(tag_dir)), Path(tag_dir) / f"{name}-rank{rank}.pt"
    if meta["world_size"] == world_size and path.is_file():
        return torch.load(path, weights_only=True)
    why = (f"it was written on {meta['world_size']} rank(s), this run has {world_size}"
           if meta["world_size"] != world_size else f"it holds no {path.name} (written by an older sparsepo)")
    log.warning("checkpoint %s: the %s state starts afresh because %s: the resume is not exact", tag_dir, name, why)
    return None
