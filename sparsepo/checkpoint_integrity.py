"""Is a checkpoint directory whole? Its sparsepo.json (written last) lists every file with its size
and sha256, and carries the sha256 of its own body (`seal`), so a damaged sparsepo.json is a damaged
checkpoint (skipped by --resume auto, refused when named) rather than a config to argue with;
`is_valid` checks them, `verify` shares the hashing among the ranks (each rank hashes the files that
carry its rank number) so every rank reaches the same verdict."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch.distributed as dist

from sparsepo.engine.collectives import gather, is_multi
from sparsepo.hashing import sha256_file

log = logging.getLogger("sparsepo")
META = "sparsepo.json"
_RANK = re.compile(r"rank[_-]?(\d+)")
BODY = "body_sha256"  # sparsepo.json's checksum of the rest of itself


def _body_sha256(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(meta: dict) -> str:
    """sparsepo.json's text: `meta` (as JSON stores it) plus the sha256 of that body."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != BODY}, default=str))
    return json.dumps({**body, BODY: _body_sha256(body)}, indent=1)


def _unsealed(meta: dict, meta_path: Path, rank: int) -> str:
    """Why `meta` is not its sealed self ("" when it is, or when an older sparsepo wrote it unsealed)."""
    if BODY not in meta:
        if rank == 0:
            log.warning("%s carries no checksum of itself (written by an older sparsepo)", meta_path)
        return ""
    body = {k: v for k, v in meta.items() if k != BODY}
    return "" if _body_sha256(body) == meta[BODY] else \
        f"{meta_path} is damaged (its content does not match its own sha256)"


def owner(rel: str, world_size: int) -> int:
    """The rank that hashes file `rel`: the first rank number in its name modulo `world_size`
    (DeepSpeed's zero_pp_rank_{r}_mp_rank_00_*, our rng-rank{r}.pt), else rank 0."""
    m = _RANK.search(Path(rel).name)
    return int(m.group(1)) % world_size if m else 0


def is_valid(tag_dir: Path, *, rank: int = 0, world_size: int = 1) -> tuple[bool, str]:
    """(ok, why not). Checks sparsepo.json and every recorded file's size; hashes the files this
    `rank` owns (see `owner`; all of them with the defaults) against their recorded sha256."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return False, "no such checkpoint directory"
    meta_path = tag_dir / META
    if not meta_path.is_file():
        return False, f"{meta_path.name} missing (interrupted while saving, or not a sparsepo checkpoint)"
    try:
        meta = json.loads(meta_path.read_text())
        files = dict(meta["files"])
        hashes = None if meta.get("sha256") is None else dict(meta["sha256"])
        if not all(key in meta for key in ("step", "samples", "world_size", "data", "config")):
            raise KeyError("a required key")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return False, f"{meta_path} is damaged"
    if why := _unsealed(meta, meta_path, rank):
        return False, why
    if not files:
        return False, f"{meta_path} lists no files"
    if hashes is not None and set(hashes) != set(files):
        return False, f"{meta_path} is damaged (its sha256 list and file list differ)"
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return False, f"{rel} missing"
        if path.stat().st_size != size:
            return False, f"{rel} has {path.stat().st_size} bytes, {size} recorded (truncated or modified)"
    if hashes is None:
        if rank == 0:
            log.warning("checkpoint %s records no sha256 (written by an older sparsepo): its files are "
                        "checked by size only", tag_dir)
        return True, ""
    for rel in sorted(files):
        if owner(rel, world_size) == rank and sha256_file(tag_dir / rel) != hashes[rel]:
            return False, f"{rel} does not match its recorded sha256 (corrupted or modified)"
    return True, ""


def verify(tag_dir: Path) -> tuple[bool, str]:
    """`is_valid` with the hashing shared among the ranks of an initialised process group; every rank
    gets the same verdict (the first failure in rank order). Collective: call it on every rank."""
    if not is_multi():
        return is_valid(tag_dir)
    verdicts = gather(is_valid(tag_dir, rank=dist.get_rank(), world_size=dist.get_world_size()))
    return next((tuple(v) for v in verdicts if not v[0]), (True, ""))
