"""The process group's store listens on the job's own address (MASTER_ADDR), not on every interface:
torch's env:// start-up binds 0.0.0.0, which on a shared cluster network lets anyone reach it."""

import subprocess
import sys

import pytest

from conftest import REPO, free_port, train_env

pytestmark = pytest.mark.integration

PROBE = """
import os
from sparsepo.engine.dist import init_distributed
init_distributed()
port = int(os.environ["MASTER_PORT"])
for name in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(name).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:  # LISTEN
            print("LISTEN", name, addr)
os._exit(0)
"""


def listening() -> list[str]:
    port = free_port()
    env = train_env() | {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("LISTEN")]


def test_the_store_listens_on_master_addr_only():
    addrs = listening()
    assert addrs == ["0100007F"], addrs  # 127.0.0.1 in /proc's byte order; no 0.0.0.0, no [::]
