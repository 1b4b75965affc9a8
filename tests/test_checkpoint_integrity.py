"""Checkpoint integrity: sha256 per file in sparsepo.json, verified on resume (in-process, no training).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_checkpoint_integrity.py -q

A checkpoint is faked: files named as DeepSpeed and sparsepo name them (two ranks), and a
sparsepo.json written as `checkpoint.save` writes it. A same-size corruption (one byte flipped, size
kept) must fail validation exactly as a truncated shard does; the end-to-end launch is in
test_checkpoint.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from conftest import RECIPE
from sparsepo.checkpoint import META, CheckpointError, find_resume, is_valid, owner, resolve
from sparsepo.config import load_config

pytestmark = pytest.mark.unit
OPTIM = "bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
FILES = ["latest_dummy", *(OPTIM.format(r=r) for r in (0, 1)), "zero_pp_rank_1_mp_rank_00_model_states.pt",
         "mp_rank_00_model_states.pt", "rng-rank0.pt", "rng-rank1.pt"]


def fake_checkpoint(tag_dir: Path, *, hashes: bool = True) -> Path:
    tag_dir.mkdir(parents=True)
    for i, name in enumerate(FILES):
        (tag_dir / name).write_bytes(bytes(range(256)) * (i + 3))
    files = {n: (tag_dir / n).stat().st_size for n in FILES}
    meta = {"step": 2, "samples": 8, "world_size": 2, "data": "d" * 64, "config": {}, "files": files}
    if hashes:
        meta["sha256"] = {n: hashlib.sha256((tag_dir / n).read_bytes()).hexdigest() for n in FILES}
    (tag_dir / META).write_text(json.dumps(meta))
    return tag_dir


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def test_same_size_corruption_is_invalid(tmp_path):
    tag = fake_checkpoint(tmp_path / "step-00000002")
    assert is_valid(tag) == (True, "")
    flip_one_byte(tag / OPTIM.format(r=1))
    assert is_valid(tag) == (False, f"{OPTIM.format(r=1)} does not match its recorded sha256 "
                                    f"(corrupted or modified)")


def test_hashing_is_shared_out_by_rank(tmp_path):
    """Rank r hashes the files naming rank r (mod world size), rank 0 the shared ones."""
    assert [owner(n, 2) for n in FILES] == [0, 0, 1, 1, 0, 0, 1]
    assert owner(OPTIM.format(r=3), 2) == 1 and owner(OPTIM.format(r=1), 1) == 0
    tag = fake_checkpoint(tmp_path / "step-00000002")
    flip_one_byte(tag / OPTIM.format(r=1))
    assert is_valid(tag, rank=0, world_size=2) == (True, "")  # not rank 0's file
    assert not is_valid(tag, rank=1, world_size=2)[0]
    flip_one_byte(tag / OPTIM.format(r=1))  # restored
    flip_one_byte(tag / "mp_rank_00_model_states.pt")  # shared: rank 0's
    assert is_valid(tag, rank=1, world_size=2) == (True, "")
    assert not is_valid(tag, rank=0, world_size=2)[0]


def cfg_for(run: Path, resume: str):
    return load_config(RECIPE, [f"logging.output_dir={run}", f"checkpoint.resume={resume}"])


def test_resume_skips_or_refuses_a_same_size_corruption(tmp_path, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    older = fake_checkpoint(ckpts / "step-00000002")
    newest = fake_checkpoint(ckpts / "step-00000004")
    shard = newest / OPTIM.format(r=0)
    flip_one_byte(shard)
    with caplog.at_level(logging.WARNING, logger="sparsepo"):
        assert find_resume(cfg_for(tmp_path / "run", "auto")) == older
    assert f"skipping checkpoint {newest}: {shard.name} does not match its recorded sha256" in caplog.text
    with pytest.raises(CheckpointError, match=rf"cannot resume from {newest}: {shard.name} does not match"):
        find_resume(cfg_for(tmp_path / "run", str(newest)))
    with pytest.raises(CheckpointError, match=rf"cannot export {newest}: {shard.name} does not match"):
        resolve(newest, action="export")
    assert resolve(tmp_path / "run") == older  # a run directory: its newest valid checkpoint


def test_checkpoint_without_hashes_is_checked_by_size_with_a_warning(tmp_path, caplog):
    tag = fake_checkpoint(tmp_path / "step-00000002", hashes=False)
    flip_one_byte(tag / OPTIM.format(r=0))  # undetectable without hashes: accepted, as before
    with caplog.at_level(logging.WARNING, logger="sparsepo"):
        assert is_valid(tag) == (True, "")
    assert "records no sha256" in caplog.text and "checked by size only" in caplog.text
    with open(tag / OPTIM.format(r=0), "ab") as f:
        f.write(b"x")
    assert "truncated or modified" in is_valid(tag)[1]
