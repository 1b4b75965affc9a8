"""Liveness without a reference group: a cache-mode run on 2 policy ranks, launched by hand (no launcher
to kill the survivor). A SIGKILLed or SIGSTOPped rank 1 makes rank 0 leave with exit 1 within a bound
tied to train.peer_timeout_s, its first error line naming the lost rank (was: a raw gloo error after a
kill, and a hang for ever after a stop), and nothing is published as final/."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, RECIPE, free_port, train_env

pytestmark = pytest.mark.distributed
LIMIT_S = 8
BOUND_S = LIMIT_S + 30  # the limit, a heartbeat, the store host's linger, leaving


def start(world, run, port):
    args = [sys.executable, "-m", "sparsepo.train", "--config", str(RECIPE), f"model.path={world.sft_dir}",
            f"data.path={world.train_path}", f"logging.output_dir={run}", "logging.progress=false",
            "logging.log_every=1", "train.micro_batch_size=2", "train.max_steps=100000", "method.name=dpo",
            f"train.peer_timeout_s={LIMIT_S}"]
    procs = []
    for rank in range(2):
        env = train_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(run / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def first_error(text: str) -> str:
    return next((line for line in text.splitlines() if " ERROR " in line), "")


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGSTOP, marks=pytest.mark.slow)],
                         ids=["sigkill", "sigstop"])
def test_a_lost_rank_is_named_and_the_other_leaves(tiny_world, tmp_path, sig):
    procs = start(tiny_world, tmp_path, free_port())
    try:
        deadline = time.time() + 240
        while "step 3 " not in (tmp_path / "rank0.log").read_text():
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                [(tmp_path / f"rank{r}.log").read_text()[-2000:] for r in range(2)]
            time.sleep(0.2)
        t0 = time.time()
        procs[1].send_signal(sig)
        code = procs[0].wait(timeout=BOUND_S + 30)
        took = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log = (tmp_path / "rank0.log").read_text()
    assert code == 1 and took <= BOUND_S, (code, took, log[-3000:])
    assert "lost policy rank 1" in first_error(log), first_error(log)
    assert not (tmp_path / "final").exists()
