"""benchmarks/profile_step.py on the tiny workload (the script a GPU session runs in one call), and what
its sync finder shows: on a step that is not a log step, the training loop reads nothing back from
the device (before: float() of every metric, the grad norm and the token count, every step)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


def test_profile_names_the_parts_and_no_host_sync_of_ours_between_log_steps(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--preset", "tiny",
                           "--modes", "cache", "--skip", "1", "--out", str(tmp_path),
                           "--override", "logging.log_every=50"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (res,) = json.loads((tmp_path / "profile.json").read_text())
    assert res["mode"] == "cache" and res["tokens_per_step"] == 2 * 2 * 16 and res["step_ms"] > 0
    for part in ("engine: backward", "engine: step (clip + AdamW + ZeRO)", "policy: body forward",
                 "policy: log-prob head", "reference: source.get", "data: collate", "loss: loss function"):
        assert res["parts"][part]["calls"] >= 1, (part, res["parts"])
    # the sync finder ran (DeepSpeed's overflow check reads the grad norm back every step)...
    assert any("deepspeed/" in k for k in res["host_syncs_from"]), res["host_syncs_from"]
    # ...and nothing of the training loop's own asked for a device value on that non-log step
    ours = {k: n for k, n in res["host_syncs_from"].items() if k.startswith(("sparsepo/trainer.py", "sparsepo/metrics.py"))
            or " grad_norm" in k}
    assert not ours, ours
