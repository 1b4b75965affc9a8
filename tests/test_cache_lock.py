"""Issue 25: two `sparsepo precompute` into one reference cache directory: the second is refused,
naming the holder and reference.cache_dir (the cache directory is locked while written)."""

import subprocess
import sys

from conftest import run_training


def test_a_second_precompute_into_one_cache_dir_is_refused(tiny_world, tmp_path):
    cache = tmp_path / "shared_cache"
    holder = subprocess.Popen(  # the first writer, mid-write: holds the cache directory's lock
        [sys.executable, "-c", "import sys, time; from sparsepo.rundir import acquire_run_lock; "
                               f"acquire_run_lock({str(cache)!r}, setting='reference.cache_dir'); "
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_training(tiny_world, tmp_path / "second", "reference.mode=precompute",
                            f"reference.cache_dir={cache}", check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{cache} is in use by another run (host" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    assert "choose another reference.cache_dir" in proc.stderr
    assert not (cache / "index.json").exists() and not list(cache.glob("shard-*"))
