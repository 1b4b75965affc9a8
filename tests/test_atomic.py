"""atomic_write gives the mode a plain open() would (umask respected), not mkstemp's 0600.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_atomic.py -q
"""

from __future__ import annotations

import os
import stat

import pytest

from sparsepo.atomic import atomic_write

pytestmark = pytest.mark.unit


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_file_respects_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = atomic_write(tmp_path / "index.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "config.yaml"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write(path, "new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "new"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (mounting needs root; skipped otherwise)."""
    import subprocess

    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_names_the_file_and_the_space_and_leaves_nothing(small_disk):
    from sparsepo.atomic import DiskFull

    (small_disk / "old.json").write_text("old")
    with pytest.raises(DiskFull) as e:
        atomic_write(small_disk / "old.json", b"x" * 2_000_000)
    msg = str(e.value)
    assert str(small_disk / "old.json") in msg and "2000000 bytes needed" in msg and "bytes free" in msg
    assert "nothing was published" in msg
    assert sorted(p.name for p in small_disk.iterdir()) == ["old.json"]  # no temporary file left behind
    assert (small_disk / "old.json").read_text() == "old"  # the older file is untouched
