"""A full disk during a checkpoint save: every rank stops with a message that names the checkpoint,
the space, and that it was not sealed (so no resume will use it) — not DeepSpeed's
"[enforce fail at inline_container.cc] unexpected pos"."""

from __future__ import annotations

import subprocess

import pytest

from conftest import run_training

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stage_file", ["zero3.json", "zero2.json"])
def test_checkpoint_on_a_full_disk_is_refused_clearly_and_left_unsealed(tiny_world, tmp_path, stage_file):
    """ZeRO-2 writes its optimiser state in other files than ZeRO-3 (GPU issue 19: ZeRO-2 died with
    the raw "unexpected pos" where ZeRO-3 gave this message)."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        proc = run_training(tiny_world, disk / "run", "method.name=simpo", "train.max_steps=2",
                            "checkpoint.every_steps=1", f"data.cache_dir={tmp_path / 'datacache'}",
                            f"deepspeed.stage_file={stage_file}", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        assert "could not be written: the disk is full" in out and "bytes free" in out, out[-3000:]
        assert "it is not sealed" in out and "unexpected pos" not in out.split("could not be written")[0][-2000:]
        failed = out.split("could not be written")[0].rsplit("checkpoint ", 1)[-1].strip()  # the tag it names
        assert failed.startswith(str(disk / "run" / "checkpoints" / "step-")), out[-3000:]
        assert not (disk / "run" / "checkpoints" / failed.rsplit("/", 1)[-1] / "sparsepo.json").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)
