"""What the launcher told this process: the one parser of launcher environments in sparsepo.

    launch = LaunchEnv.from_environ()               # deepspeed, torchrun, srun, mpirun or a lone process
    os.environ.update(torch_dist_env(os.environ))   # RANK / WORLD_SIZE / ... / MASTER_PORT for torch.distributed
    python -m sparsepo.launch --print-env           # the same, as shell `export` lines (launcher/launch.sh)

Pure stdlib, no torch import. Which launcher it was is read from its variables, in this order:

* ``deepspeed``: RANK + WORLD_SIZE with CROSS_RANK / CROSS_SIZE (its node index and count).
* ``torchrun``: RANK + WORLD_SIZE (also anything that exports env:// variables by hand, also under
  srun: the rest - local rank, node - then comes from Slurm); GROUP_RANK / GROUP_WORLD_SIZE, and
  TORCHELASTIC_USE_AGENT_STORE=True says the agent already serves a store on MASTER_PORT.
* ``mpi``: Open MPI's OMPI_COMM_WORLD_* (mpirun, also inside a Slurm allocation, where SLURM_PROCID
  is the daemon's, not the rank's), else PMI_RANK / PMI_SIZE (MPICH, Intel MPI) unless they merely
  mirror SLURM_PROCID / SLURM_NTASKS (``srun --mpi=pmi2``).
* ``slurm``: SLURM_PROCID / SLURM_NTASKS (srun), with SLURM_LOCALID, SLURM_NODEID, the node list
  (`expand_hostlist`) and SLURM_[STEP_]TASKS_PER_NODE (`parse_tasks_per_node`).
* ``single``: none of these - one process.

MASTER_ADDR: the variable, else the first host of the node list (Slurm's, or SPARSEPO_HOSTS for any
launcher), else 127.0.0.1 (loopback, not DeepSpeed's ``hostname -I``). MASTER_PORT: the rule in
`sparsepo.launch.ports`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from sparsepo.launch.hostlist import expand_hostlist, parse_tasks_per_node
from sparsepo.launch.ports import DEFAULT_MASTER_PORT, JOB_ID_VARS, free_port, job_port
from sparsepo.launch.errors import TopologyError

__all__ = [
    "DEFAULT_MASTER_ADDR",
    "LAUNCH_MODES",
    "LaunchEnv",
    "expand_hostlist",
    "global_launch_env",
    "launch_mode",
    "master_port_from",
    "parse_tasks_per_node",
    "torch_dist_env",
]

DEFAULT_MASTER_ADDR = "127.0.0.1"
LAUNCHERS = ("torchrun", "deepspeed", "slurm", "mpi", "single")
LAUNCH_MODES = ("slurm", "mpi", "local")
"""What launcher/launch.sh must do: `launch_mode`."""

GLOBAL_PREFIX = "SPARSEPO_GLOBAL_"
HOSTS_VAR = "SPARSEPO_HOSTS"
"""Optional, any launcher: node host names in node-rank order, comma list or Slurm hostlist."""


# --------------------------------------------------------------------------------------------
# The launch
# --------------------------------------------------------------------------------------------

def _int(env: Mapping[str, str], *names: str) -> int | None:
    """First of ``names`` present in env, as an int; None if none is."""
    for name in names:
        raw = env.get(name)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            return int(str(raw).strip())
        except ValueError:
            raise TopologyError(f"{name}={raw!r} is not an integer") from None
    return None


def _first(*values: int | None) -> int | None:
    for v in values:
        if v is not None:
            return v
    return None


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """What the launcher told this process, whichever launcher it was.

    ``tasks_per_node`` lists the processes of this launch on each node in node order when known
    (Slurm gives it; for the others it is derived when the nodes are uniform), else ``()``.
    ``hosts`` lists node host names in node order when known (Slurm's nodelist, or
    ``SPARSEPO_HOSTS``), else ``()``. ``agent_store`` is True under torchrun, whose agent already
    serves a TCPStore on ``master_port``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: str
    hosts: tuple[str, ...] = ()
    tasks_per_node: tuple[int, ...] = ()
    agent_store: bool = False

    def __post_init__(self) -> None:
        where = f"({self.launcher} launch)"
        if self.launcher not in LAUNCHERS:
            raise TopologyError(f"launcher={self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.world_size < 1:
            raise TopologyError(f"world_size={self.world_size} must be at least 1 {where}")
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(
                f"rank={self.rank} is outside 0..world_size-1 = 0..{self.world_size - 1} {where}")
        if self.local_world_size < 1:
            raise TopologyError(f"local_world_size={self.local_world_size} must be at least 1 {where}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise TopologyError(
                f"local_rank={self.local_rank} is outside 0..local_world_size-1 = "
                f"0..{self.local_world_size - 1} {where}")
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise TopologyError(
                f"node_rank={self.node_rank} is outside 0..num_nodes-1 = 0..{self.num_nodes - 1} {where}")
        if not 0 < self.master_port < 65536:
            raise TopologyError(f"master_port={self.master_port} is not a TCP port (1..65535) {where}")
        if self.tasks_per_node and sum(self.tasks_per_node) != self.world_size:
            raise TopologyError(
                f"tasks_per_node={list(self.tasks_per_node)} sums to {sum(self.tasks_per_node)}, "
                f"not world_size={self.world_size} {where}")

    # -- derived ---------------------------------------------------------------------------
    @property
    def ranks_per_node(self) -> int | None:
        """The common number of processes per node, or None when nodes differ or it is unknown."""
        if self.tasks_per_node:
            return self.tasks_per_node[0] if len(set(self.tasks_per_node)) == 1 else None
        if self.num_nodes * self.local_world_size == self.world_size:
            return self.local_world_size
        return None

    def node_of(self, global_rank: int) -> int | None:
        """Node index of a global rank, assuming block placement (ranks fill nodes in order)."""
        if self.tasks_per_node:
            acc = 0
            for node, n in enumerate(self.tasks_per_node):
                acc += n
                if global_rank < acc:
                    return node
            return None
        if self.num_nodes == 1:
            return 0
        rpn = self.ranks_per_node
        return global_rank // rpn if rpn else None

    def host_of_node(self, node: int) -> str | None:
        """Host name of a node: the launch's MASTER_ADDR for node 0 (global rank 0 lives there),
        ``hosts[node]`` for the others when hosts are known, else None."""
        if node == 0:
            return self.master_addr
        if 0 <= node < len(self.hosts):
            return self.hosts[node]
        return None

    # -- readers ---------------------------------------------------------------------------
    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> "LaunchEnv":
        """Read the launch from ``env`` (default ``os.environ``); precedence in the module docstring.
        SPARSEPO_GLOBAL_* are ignored here: see `global_launch_env`.

        Run the trainer under ``srun`` inside ``sbatch``: the batch script itself also carries
        SLURM_PROCID=0 and SLURM_NTASKS, and a process started there directly would wait for
        peers that never come (`launch_mode` tells launch.sh which of the two it is).
        """
        env = os.environ if env is None else env

        def has(*names: str) -> bool:
            return all(str(env.get(n, "")).strip() != "" for n in names)

        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                    or env.get("SLURM_NODELIST") or "")
        hosts_src = env.get(HOSTS_VAR) or nodelist
        hosts = tuple(expand_hostlist(hosts_src)) if hosts_src else ()

        slurm_tpn_raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        slurm_tpn = parse_tasks_per_node(slurm_tpn_raw) if slurm_tpn_raw else []
        slurm_nnodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
        slurm_node = _int(env, "SLURM_NODEID")
        slurm_local = _int(env, "SLURM_LOCALID")
        slurm_ntpn = _int(env, "SLURM_NTASKS_PER_NODE")

        def slurm_local_size(node: int | None) -> int | None:
            if slurm_tpn and node is not None and 0 <= node < len(slurm_tpn):
                return slurm_tpn[node]
            return slurm_ntpn

        # srun --mpi=pmi2 sets PMI_RANK == SLURM_PROCID: that is a Slurm launch. mpiexec (Hydra) under
        # Slurm also has SLURM_PROCID, but that is its proxy's index, not the rank: an MPI launch.
        srun_with_pmi = (has("SLURM_PROCID", "SLURM_NTASKS")
                         and _int(env, "PMI_RANK") == _int(env, "SLURM_PROCID")
                         and _int(env, "PMI_SIZE") == _int(env, "SLURM_NTASKS"))
        agent_store = str(env.get("TORCHELASTIC_USE_AGENT_STORE", "")) == "True"
        tasks_per_node: tuple[int, ...] = ()

        if has("RANK", "WORLD_SIZE"):
            if has("CROSS_RANK") or has("CROSS_SIZE"):
                launcher = "deepspeed"
            else:
                launcher = "torchrun"  # torchrun, or env:// variables exported by hand
            rank = _int(env, "RANK")
            world = _int(env, "WORLD_SIZE")
            local_rank = _first(_int(env, "LOCAL_RANK"), slurm_local,
                                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), 0)
            local_size = _first(_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE"),
                                _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"))
            node_rank = _int(env, "GROUP_RANK", "CROSS_RANK", "NODE_RANK")
            num_nodes = _int(env, "GROUP_WORLD_SIZE", "CROSS_SIZE", "NNODES")
            if local_size is None:  # hand-exported RANK under srun: the rest from Slurm
                local_size = slurm_local_size(slurm_node)
            if local_size is None:
                local_size = world if num_nodes in (None, 1) else max(1, world // num_nodes)
            if node_rank is None:
                node_rank = slurm_node if slurm_node is not None else rank // local_size
            if num_nodes is None:
                num_nodes = slurm_nnodes if (slurm_nnodes and node_rank < slurm_nnodes) \
                    else max(node_rank + 1, math.ceil(world / local_size))
        elif has("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE") or (
                has("PMI_RANK", "PMI_SIZE") and not srun_with_pmi):
            launcher = "mpi"
            if has("OMPI_COMM_WORLD_RANK"):
                rank = _int(env, "OMPI_COMM_WORLD_RANK")
                world = _int(env, "OMPI_COMM_WORLD_SIZE")
                local_rank = _first(_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), 0)
                local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
            else:
                rank = _int(env, "PMI_RANK")
                world = _int(env, "PMI_SIZE")
                local_rank = _first(_int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK"), 0)
                local_size = _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
            if local_size is None:
                local_size = world
            # Open MPI has no node-index variable: assume the default by-slot mapping (nodes filled in order).
            node_rank = rank // local_size
            num_nodes = max(node_rank + 1, math.ceil(world / local_size))
        elif has("SLURM_PROCID", "SLURM_NTASKS"):
            launcher = "slurm"
            rank = _int(env, "SLURM_PROCID")
            world = _int(env, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")
            local_rank = _first(slurm_local, 0)
            num_nodes = _first(slurm_nnodes, len(slurm_tpn) or None, len(hosts) or None, 1)
            node_rank = _first(slurm_node, 0)
            local_size = slurm_local_size(node_rank)
            if slurm_tpn and sum(slurm_tpn) == world:
                tasks_per_node = tuple(slurm_tpn)
                num_nodes = len(slurm_tpn)
            elif slurm_ntpn and slurm_ntpn * num_nodes == world:
                tasks_per_node = (slurm_ntpn,) * num_nodes
            if local_size is None:
                local_size = math.ceil(world / num_nodes)
        else:
            launcher = "single"
            rank, world, local_rank, local_size, node_rank, num_nodes = 0, 1, 0, 1, 0, 1

        assert rank is not None and world is not None and local_size is not None
        if not tasks_per_node and num_nodes * local_size == world:
            tasks_per_node = (local_size,) * num_nodes

        master_addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else DEFAULT_MASTER_ADDR)
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_size,
                   node_rank=node_rank, num_nodes=num_nodes, master_addr=master_addr,
                   master_port=master_port_from(env), launcher=launcher, hosts=hosts,
                   tasks_per_node=tasks_per_node, agent_store=agent_store)

    # -- keeping the global identity across the rewrite ------------------------------------
    def to_global_env(self) -> dict[str, str]:
        """This launch as SPARSEPO_GLOBAL_* variables (what `apply_role_env` keeps)."""
        p = GLOBAL_PREFIX
        return {
            p + "RANK": str(self.rank),
            p + "WORLD_SIZE": str(self.world_size),
            p + "LOCAL_RANK": str(self.local_rank),
            p + "LOCAL_WORLD_SIZE": str(self.local_world_size),
            p + "NODE_RANK": str(self.node_rank),
            p + "NUM_NODES": str(self.num_nodes),
            p + "MASTER_ADDR": self.master_addr,
            p + "MASTER_PORT": str(self.master_port),
            p + "LAUNCHER": self.launcher,
            p + "HOSTS": ",".join(self.hosts),
            p + "TASKS_PER_NODE": ",".join(str(n) for n in self.tasks_per_node),
            p + "AGENT_STORE": str(self.agent_store),
        }

    @classmethod
    def from_global_env(cls, env: Mapping[str, str]) -> "LaunchEnv":
        """Inverse of `to_global_env`; needs SPARSEPO_GLOBAL_RANK and SPARSEPO_GLOBAL_WORLD_SIZE."""
        p = GLOBAL_PREFIX
        rank, world = _int(env, p + "RANK"), _int(env, p + "WORLD_SIZE")
        if rank is None or world is None:
            raise TopologyError(f"{p}RANK / {p}WORLD_SIZE are not set: this process was never rewritten")
        local_rank = _first(_int(env, p + "LOCAL_RANK"), 0)
        local_size = _first(_int(env, p + "LOCAL_WORLD_SIZE"), world)
        hosts = tuple(h for h in env.get(p + "HOSTS", "").split(",") if h)
        tpn = tuple(int(n) for n in env.get(p + "TASKS_PER_NODE", "").split(",") if n.strip())
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_size,
                   node_rank=_first(_int(env, p + "NODE_RANK"), 0),
                   num_nodes=_first(_int(env, p + "NUM_NODES"), 1),
                   master_addr=env.get(p + "MASTER_ADDR") or DEFAULT_MASTER_ADDR,
                   master_port=_first(_int(env, p + "MASTER_PORT"), DEFAULT_MASTER_PORT),
                   launcher=env.get(p + "LAUNCHER") or "single", hosts=hosts, tasks_per_node=tpn,
                   agent_store=env.get(p + "AGENT_STORE") == "True")


def global_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """The process's global launch: from SPARSEPO_GLOBAL_* after a rewrite, else `LaunchEnv.from_environ`.

    SPARSEPO_GLOBAL_* are inherited by children: a process that starts a *new* launch (a nested
    torchrun, a precompute subprocess) must drop them from the child's environment first."""
    env = os.environ if env is None else env
    if str(env.get(GLOBAL_PREFIX + "RANK", "")).strip():
        return LaunchEnv.from_global_env(env)
    return LaunchEnv.from_environ(env)



# --------------------------------------------------------------------------------------------
# The port rule, torch.distributed's variables, and what launch.sh must do
# --------------------------------------------------------------------------------------------

def master_port_from(env: Mapping[str, str]) -> int:
    """MASTER_PORT of a launch: the variable, else the job's port, else DEFAULT_MASTER_PORT
    (rules 1-3 of `sparsepo.launch.ports`)."""
    port = _int(env, "MASTER_PORT")
    if port is not None:
        return port
    job_id = _int(env, *JOB_ID_VARS)
    return job_port(job_id) if job_id is not None else DEFAULT_MASTER_PORT


def torch_dist_env(env: Mapping[str, str], *, lone_port: Callable[[], int] = free_port) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR and
    MASTER_PORT for torch.distributed's env:// start-up, from whatever launcher started this process.
    CROSS_RANK / CROSS_SIZE (the node's index and the node count) are the deepspeed launcher's names,
    read by DeepSpeed's checkpoint writer (checkpoint.async_write) whatever the launcher.

    Apply with ``os.environ.update(torch_dist_env(os.environ))`` before the process group starts.
    LOCAL_SIZE is DeepSpeed's CPU accelerator's name for LOCAL_WORLD_SIZE (its device count). A
    process whose environment was rewritten for its role (`sparsepo.launch.process`) gets its role's
    world back unchanged: RANK / WORLD_SIZE there already describe it. A lone process without
    MASTER_PORT takes ``lone_port()`` (a free port, rule 4 of `sparsepo.launch.ports`).
    """
    launch = LaunchEnv.from_environ(env)
    port = launch.master_port
    if launch.launcher == "single" and _int(env, "MASTER_PORT") is None:
        port = lone_port()
    return {"RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size),
            "LOCAL_RANK": str(launch.local_rank), "LOCAL_WORLD_SIZE": str(launch.local_world_size),
            "LOCAL_SIZE": str(launch.local_world_size), "CROSS_RANK": str(launch.node_rank),
            "CROSS_SIZE": str(launch.num_nodes), "MASTER_ADDR": launch.master_addr, "MASTER_PORT": str(port)}


def launch_mode(env: Mapping[str, str]) -> str:
    """What launcher/launch.sh must do here: ``slurm`` (an srun task) or ``mpi`` (an mpirun rank) -
    the launcher already started one process per rank, which only needs `torch_dist_env` - or
    ``local``: start the processes itself. SPARSEPO_LAUNCH_MODE forces one.

    Not `LaunchEnv.launcher`: a batch script has SLURM_PROCID and SLURM_NTASKS but no job step,
    and a process started there would wait for peers that never come, so it is ``local``."""
    forced = str(env.get("SPARSEPO_LAUNCH_MODE", "")).strip()
    if forced:
        if forced not in LAUNCH_MODES:
            raise TopologyError(f"SPARSEPO_LAUNCH_MODE must be one of {', '.join(LAUNCH_MODES)}, not {forced!r}")
        return forced
    if str(env.get("OMPI_COMM_WORLD_RANK", "")).strip():
        return "mpi"  # mpirun, also inside a Slurm allocation
    step = str(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "").strip()
    if str(env.get("SLURM_PROCID", "")).strip() and step:
        return "slurm"
    return "local"
