"""Every port number sparsepo chooses, and the one rule behind them.

The rule (Python is the only place it lives; launcher/launch.sh asks ``python -m sparsepo.launch``):

1. ``MASTER_PORT`` when the launcher (or the user) set it: always wins.
2. Else, inside a scheduler job, a port derived from the job id, ``20000 + job_id % 10000``
   (`job_port`), from SLURM_JOB_ID (srun, or mpirun inside an allocation) or else Open MPI's
   OMPI_MCA_ess_base_jobid (mpirun). Every process of one job computes the same number without
   talking to the others, and two jobs on one node rarely collide (they do when their ids differ
   by 1 or 2, since each job uses base..base+3 below: set MASTER_PORT explicitly there).
3. Else `DEFAULT_MASTER_PORT` (29500, torch's and DeepSpeed's own default) for a multi-process
   launch with neither.
4. A process that has no peers to agree with - a lone ``python -m sparsepo.train``, or a launch this
   process starts itself on one machine (``launch.sh --nproc N``, ``sparsepo train --nproc N``) - takes
   `free_port` instead of 29500, so two such runs on one machine cannot collide.

From that base, a live run (policy + reference group) gives each world its own port
(`role_ports`): policy ``base``, reference ``base + 1``, bridge ``base + 2``. Under torchrun the
elastic agent's TCPStore already listens on ``base`` (TORCHELASTIC_USE_AGENT_STORE=True), so there
everything moves up by one: policy ``base + 1``, reference ``base + 2``, bridge ``base + 3``.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from sparsepo.launch.errors import TopologyError

__all__ = ["DEFAULT_MASTER_PORT", "JOB_PORT_BASE", "JOB_PORT_SPAN", "free_port", "job_port", "role_ports"]

DEFAULT_MASTER_PORT = 29500
JOB_PORT_BASE = 20000
JOB_PORT_SPAN = 10000
JOB_ID_VARS = ("SLURM_JOB_ID", "SLURM_JOBID", "OMPI_MCA_ess_base_jobid")
"""Where a job id comes from, first present wins (Slurm's first: mpirun inside an allocation sees both)."""

POLICY_PORT_OFFSET = 0
REFERENCE_PORT_OFFSET = 1
BRIDGE_PORT_OFFSET = 2


def job_port(job_id: int) -> int:
    """Rule 2: the port every process of job ``job_id`` derives on its own."""
    return JOB_PORT_BASE + job_id % JOB_PORT_SPAN


FREE_PORT_MIN = JOB_PORT_BASE + JOB_PORT_SPAN
"""Rule 4 draws its ports from FREE_PORT_MIN up to the kernel's ephemeral range, clear of rule 2's."""
ROLE_PORTS = 4
"""base .. base+3: what `role_ports` may use (torchrun's shift included)."""


def _ephemeral_low() -> int:
    """The first port the kernel hands out as the local end of outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """Rule 4: a base port such that base .. base+3 (`role_ports`) nobody listens on right now, drawn
    at random **below the kernel's ephemeral range**. The kernel's own choice for 127.0.0.1:0 lies in
    that range, and so does the local port of every outgoing connection: between choosing a port and
    binding it, one of this job's own connections (a gloo pair, the bridge's clients) could be handed
    it — seen as EADDRINUSE on the master port in a 2-process live test. Falls back to the kernel's
    choice when no candidate is free."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        if low - ROLE_PORTS <= FREE_PORT_MIN:
            break
        base = rng.randint(FREE_PORT_MIN, low - ROLE_PORTS)
        if all(_bindable(port) for port in range(base, base + ROLE_PORTS)):
            return base
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_ports(base: int, *, agent_store: bool) -> dict[str, int]:
    """Port of each world of a live run from the launch's MASTER_PORT ``base`` (module docstring)."""
    shift = 1 if agent_store else 0
    out = {"policy": base + shift + POLICY_PORT_OFFSET, "reference": base + shift + REFERENCE_PORT_OFFSET,
           "bridge": base + shift + BRIDGE_PORT_OFFSET}
    if max(out.values()) > 65535:
        raise TopologyError(
            f"MASTER_PORT={base}: the bridge needs port {out['bridge']} > 65535; "
            f"use MASTER_PORT <= {65535 - BRIDGE_PORT_OFFSET - shift}")
    return out
