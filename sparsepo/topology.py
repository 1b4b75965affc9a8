"""Who is who in one launch: global rank -> role (policy or reference), and each role's own world.

Pure stdlib, CPU-testable, no torch import. One launch (`deepspeed`, `torchrun`, `srun` under
`sbatch`, or `mpirun`) starts every process; each process then does

    launch = LaunchEnv.from_environ()                    # what the launcher told it
    topo = Topology.from_launch(cfg.topology, launch, num_layers=n)   # refuses bad shapes, before any group
    role = topo.role_of(launch.rank)
    os.environ.update(topo.process_env(launch.rank, launch, os.environ))  # before deepspeed starts

or all of it at once with `plan(cfg.topology)`.

Layout
------
With P policy ranks and a reference group of R replicas x S pipeline stages (R*S reference ranks):

* ``placement="last"``: policy = global ranks 0..P-1; replica r, stage s = global rank P + r*S + s
  (the stages of a replica are neighbours, so a replica stays on one node when it fits; with
  whole nodes for the reference it occupies the last nodes).
* ``placement="interleaved"``: the world is cut into R*S equal blocks of W/(R*S) consecutive ranks;
  the *last* rank of block j is reference rank j in (replica, stage) order, the others are policy
  ranks. Needs W % (R*S) == 0 and, with ``ranks_per_node`` known, blocks that line up with nodes
  (block % ranks_per_node == 0 or ranks_per_node % block == 0) so every node holds the same number
  of reference ranks (or whole nodes alternate).

Global rank 0 is always a policy rank, in both placements.

Role worlds
-----------
DeepSpeed assumes it owns the whole ``torch.distributed`` world, so each role gets its own:

* policy: RANK = policy index (0..P-1, in global-rank order), WORLD_SIZE = P.
* reference: WORLD_SIZE = R*S and RANK = stage * R + replica. This is DeepSpeed's own
  ``PipeDataParallelTopology(num_pp=S, num_dp=R)`` order (axes ['pipe', 'data'], rank =
  pipe * num_dp + data), so a plain ``PipelineModule(num_stages=S)`` over the reference world puts
  every process on the stage this module assigned it.
* LOCAL_RANK and LOCAL_WORLD_SIZE stay the *physical* ones of the launch: LOCAL_RANK is the device
  index (DeepSpeed's CPU accelerator also reads LOCAL_SIZE, which is left alone).
* MASTER_ADDR is the host of the role's rank 0 (the launch's MASTER_ADDR for the policy, whose rank
  0 is global rank 0; for the reference: ``hosts[node_of(first reference rank)]``).
* Ports, from the launch's MASTER_PORT ``base``: policy ``base``, reference ``base + 1``, bridge
  ``base + 2``. Under torchrun the elastic agent's TCPStore already listens on ``base``
  (TORCHELASTIC_USE_AGENT_STORE=True), so there everything moves up by one: policy ``base + 1``,
  reference ``base + 2``, bridge ``base + 3``, and the role env sets
  TORCHELASTIC_USE_AGENT_STORE=False so rank 0 of each role hosts its own store. Keep those ports
  free (with the Slurm default ``20000 + SLURM_JOB_ID % 10000`` two jobs on one node whose ids
  differ by 1 or 2 would collide: set MASTER_PORT explicitly there).
* The **bridge** spans all W processes with their *global* ranks (a TCPStore on the launch's
  MASTER_ADDR, which hosts global rank 0, plus a gloo group). ``bridge_address(launch)``.

With reference_ranks == 0 (cache mode) every rank is a policy rank and ``role_env`` is exactly the
launch's environment (same port, agent store untouched).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from sparsepo.config import TopologyConfig

__all__ = [
    "DEFAULT_MASTER_ADDR",
    "DEFAULT_MASTER_PORT",
    "PLACEMENTS",
    "LaunchEnv",
    "ProcessPlan",
    "Role",
    "Topology",
    "TopologyError",
    "apply_role_env",
    "expand_hostlist",
    "global_launch_env",
    "parse_tasks_per_node",
    "plan",
]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 20000
"""Under Slurm without MASTER_PORT: 20000 + SLURM_JOB_ID % 10000 (same on every task of a job)."""
PLACEMENTS = ("last", "interleaved")
LAUNCHERS = ("torchrun", "deepspeed", "slurm", "mpi", "single")

POLICY_PORT_OFFSET = 0
REFERENCE_PORT_OFFSET = 1
BRIDGE_PORT_OFFSET = 2

GLOBAL_PREFIX = "SPARSEPO_GLOBAL_"
HOSTS_VAR = "SPARSEPO_HOSTS"
"""Optional, any launcher: node host names in node-rank order, comma list or Slurm hostlist."""


class TopologyError(ValueError):
    """A launch or a topology that cannot work; the message carries the arithmetic and the fix."""


# --------------------------------------------------------------------------------------------
# Slurm strings
# --------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise TopologyError(f"hostlist {text!r}: nested '[' is not valid Slurm hostlist syntax")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise TopologyError(f"hostlist {text!r}: ']' without a matching '['")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise TopologyError(f"hostlist {text!r}: '[' without a matching ']'")
    parts.append("".join(cur))
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise TopologyError(f"hostlist {whole!r}: {item!r} inside [...] is not N or N-M")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise TopologyError(f"hostlist {whole!r}: range {item!r} runs backwards ({hi} < {lo})")
        width = len(lo_s)  # Slurm pads to the width of the lower bound: [01-10] -> 01..10
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist (what ``scontrol show hostnames`` does), in pure Python.

    ``node[1-3,5]`` -> node1 node2 node3 node5; ``a1,b[01-02]`` -> a1 b01 b02; zero padding follows
    the lower bound (``n[001-003]``); several bracket groups multiply out
    (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2). Order is kept, duplicates are kept.
    """
    hosts: list[str] = []
    text = (hostlist or "").strip()
    if not text:
        return hosts
    for entry in _split_top_level(text):
        entry = entry.strip()
        if not entry:
            continue
        pieces = re.split(r"(\[[^\]]*\])", entry)
        names = [""]
        for piece in pieces:
            if not piece:
                continue
            if piece.startswith("["):
                options = _expand_range_set(piece[1:-1], hostlist)
                names = [n + o for n in names for o in options]
            else:
                names = [n + piece for n in names]
        hosts.extend(names)
    return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE: ``2(x3),1`` -> [2, 2, 2, 1]; ``4`` -> [4]."""
    out: list[int] = []
    text = (spec or "").strip()
    if not text:
        return out
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise TopologyError(f"SLURM_TASKS_PER_NODE={spec!r}: {item!r} is not N or N(xM)")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


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


@dataclass(frozen=True)
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
        """Read the launch from ``env`` (default ``os.environ``).

        Precedence for rank / world size: explicit RANK + WORLD_SIZE (torchrun, the deepspeed
        launcher, or set by hand, also under srun) > Open MPI's OMPI_COMM_WORLD_* (mpirun, also
        inside a Slurm allocation, where SLURM_PROCID is the daemon's, not the rank's) > Slurm
        (SLURM_PROCID / SLURM_NTASKS, i.e. srun) > PMI_RANK / PMI_SIZE (MPICH, Intel MPI) > a single
        process. SPARSEPO_GLOBAL_* are ignored here: see `global_launch_env`.

        Run the trainer under ``srun`` inside ``sbatch``: the batch script itself also carries
        SLURM_PROCID=0 and SLURM_NTASKS, and a process started there directly would wait for
        peers that never come.
        """
        env = os.environ if env is None else env

        def has(*names: str) -> bool:
            return all(str(env.get(n, "")).strip() != "" for n in names)

        slurm_job_id = _int(env, "SLURM_JOB_ID", "SLURM_JOBID")
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
        master_port = _int(env, "MASTER_PORT")
        if master_port is None:
            master_port = (SLURM_PORT_BASE + slurm_job_id % 10000) if slurm_job_id is not None \
                else DEFAULT_MASTER_PORT
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_size,
                   node_rank=node_rank, num_nodes=num_nodes, master_addr=master_addr,
                   master_port=master_port, launcher=launcher, hosts=hosts,
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
# Roles and the topology
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Role:
    """One process's role. Policy: ``index`` (= role_rank) of ``num_policy``. Reference: ``stage``
    of ``num_stages`` in ``replica`` of ``num_replicas``; role_rank = stage * num_replicas + replica
    (DeepSpeed's pipe-major order)."""

    kind: str
    global_rank: int
    role_rank: int
    role_world_size: int
    stage: int | None = None
    replica: int | None = None
    num_stages: int | None = None
    num_replicas: int | None = None
    index: int | None = None
    num_policy: int | None = None

    @property
    def is_policy(self) -> bool:
        return self.kind == "policy"

    @property
    def is_reference(self) -> bool:
        return self.kind == "reference"

    @property
    def is_first_stage(self) -> bool:
        return self.is_reference and self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.is_reference and self.num_stages is not None and self.stage == self.num_stages - 1

    def label(self) -> str:
        if self.is_policy:
            return f"policy {self.index}/{self.num_policy}"
        return f"reference replica {self.replica}/{self.num_replicas} stage {self.stage}/{self.num_stages}"


def _cfg_value(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _check_int(name: str, value: Any, minimum: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise TopologyError(f"{name}={value} must be at least {minimum}{why}")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Topology:
    """The rank -> role map of one launch. Build it with `Topology.build` (which refuses bad shapes)."""

    world_size: int
    num_policy: int
    num_stages: int
    num_replicas: int
    placement: str
    ranks_per_node: int | None
    num_layers: int | None
    roles: tuple[Role, ...] = field(repr=False)

    @property
    def num_reference(self) -> int:
        return self.num_stages * self.num_replicas

    @property
    def live(self) -> bool:
        """True when there is a reference group (live mode); False in cache mode."""
        return self.num_reference > 0

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: "TopologyConfig | Any", world_size: int, *, ranks_per_node: int | None = None,
              num_layers: int | None = None) -> "Topology":
        """Map ``world_size`` ranks to roles per ``cfg`` (a TopologyConfig or anything with
        reference_ranks / pipeline_stages / placement). Raises `TopologyError` before any process
        group exists when the shape cannot work."""
        n_ref = _cfg_value(cfg, "reference_ranks", 0)
        stages = _cfg_value(cfg, "pipeline_stages", 1)
        placement = _cfg_value(cfg, "placement", "last")

        _check_int("world_size", world_size, 1)
        _check_int("topology.reference_ranks", n_ref, 0, " (0 = no reference group)")
        _check_int("topology.pipeline_stages", stages, 1, " (1 = no pipeline)")
        if ranks_per_node is not None:
            _check_int("ranks_per_node", ranks_per_node, 1)
        if num_layers is not None:
            _check_int("num_layers", num_layers, 1)
        if not isinstance(placement, str) or placement not in PLACEMENTS:
            raise TopologyError(
                f"topology.placement={placement!r} is not a placement; valid values: "
                f"{', '.join(repr(p) for p in PLACEMENTS)}")
        if ranks_per_node is not None and world_size % ranks_per_node:
            raise TopologyError(
                f"world_size={world_size} is not a multiple of ranks_per_node={ranks_per_node}: "
                f"{world_size} % {ranks_per_node} = {world_size % ranks_per_node}; nodes must hold "
                f"equal numbers of ranks (pass ranks_per_node=None for uneven nodes)")

        if n_ref == 0:  # cache mode: pipeline_stages only matters to the precompute run
            roles = tuple(Role(kind="policy", global_rank=g, role_rank=g, role_world_size=world_size,
                               index=g, num_policy=world_size) for g in range(world_size))
            return cls(world_size=world_size, num_policy=world_size, num_stages=stages, num_replicas=0,
                       placement=placement, ranks_per_node=ranks_per_node, num_layers=num_layers,
                       roles=roles)

        if n_ref % stages:
            raise TopologyError(
                f"topology.reference_ranks={n_ref} is not a multiple of topology.pipeline_stages={stages}: "
                f"{n_ref} % {stages} = {n_ref % stages}; every reference replica needs all {stages} stages "
                f"(use reference_ranks = {stages} x replicas, e.g. {stages * max(1, n_ref // stages)})")
        if n_ref >= world_size:
            raise TopologyError(
                f"topology.reference_ranks={n_ref} leaves no policy ranks in a world of {world_size}: "
                f"world_size - reference_ranks = {world_size} - {n_ref} = {world_size - n_ref}; "
                f"at least one rank must train the policy (launch more processes or lower reference_ranks)")
        if num_layers is not None and stages > num_layers:
            raise TopologyError(
                f"topology.pipeline_stages={stages} > num_layers={num_layers}: each pipeline stage "
                f"needs at least one layer, so at most {num_layers} stages")
        replicas = n_ref // stages
        num_policy = world_size - n_ref

        # reference rank j in (replica, stage) order -> global rank
        if placement == "last":
            ref_globals = [num_policy + j for j in range(n_ref)]
        else:
            ref_globals = cls._interleave(world_size, n_ref, ranks_per_node)

        ref_set = set(ref_globals)
        policy_globals = [g for g in range(world_size) if g not in ref_set]
        assert len(policy_globals) == num_policy and policy_globals[0] == 0
        roles: list[Role | None] = [None] * world_size
        for i, g in enumerate(policy_globals):
            roles[g] = Role(kind="policy", global_rank=g, role_rank=i, role_world_size=num_policy,
                            index=i, num_policy=num_policy)
        for j, g in enumerate(ref_globals):
            replica, stage = divmod(j, stages)
            roles[g] = Role(kind="reference", global_rank=g, role_rank=stage * replicas + replica,
                            role_world_size=n_ref, stage=stage, replica=replica, num_stages=stages,
                            num_replicas=replicas)
        assert all(r is not None for r in roles)
        return cls(world_size=world_size, num_policy=num_policy, num_stages=stages, num_replicas=replicas,
                   placement=placement, ranks_per_node=ranks_per_node, num_layers=num_layers,
                   roles=tuple(roles))  # type: ignore[arg-type]

    @staticmethod
    def _interleave(world_size: int, n_ref: int, ranks_per_node: int | None) -> list[int]:
        if world_size % n_ref:
            fits = [d for d in _divisors(world_size) if d < world_size]
            raise TopologyError(
                f"topology.placement='interleaved' puts one reference rank at the end of each block of "
                f"world_size / reference_ranks ranks, but world_size={world_size} is not a multiple of "
                f"reference_ranks={n_ref}: {world_size} % {n_ref} = {world_size % n_ref}, so the blocks "
                f"cannot be equal. Use reference_ranks in {fits} (and a multiple of pipeline_stages) "
                f"or placement='last'")
        block = world_size // n_ref
        ref_globals = [(j + 1) * block - 1 for j in range(n_ref)]
        if ranks_per_node is not None and block % ranks_per_node and ranks_per_node % block:
            nodes = world_size // ranks_per_node
            counts = [0] * nodes
            for g in ref_globals:
                counts[g // ranks_per_node] += 1
            per_node = ", ".join(f"node {n}: {c}" for n, c in enumerate(counts))
            raise TopologyError(
                f"topology.placement='interleaved' with ranks_per_node={ranks_per_node}: blocks of "
                f"world_size / reference_ranks = {world_size} / {n_ref} = {block} ranks do not line up "
                f"with nodes of {ranks_per_node} ranks ({block} % {ranks_per_node} = "
                f"{block % ranks_per_node} and {ranks_per_node} % {block} = {ranks_per_node % block}), "
                f"so nodes would hold unequal numbers of reference ranks ({per_node}). Choose "
                f"reference_ranks so that the block divides or is a multiple of ranks_per_node, "
                f"or placement='last'")
        return ref_globals

    @classmethod
    def from_launch(cls, cfg: "TopologyConfig | Any", launch: LaunchEnv, *,
                    num_layers: int | None = None) -> "Topology":
        """`build` for this launch's world, with its ranks per node when the nodes are uniform."""
        return cls.build(cfg, launch.world_size, ranks_per_node=launch.ranks_per_node,
                         num_layers=num_layers)

    # -- queries ---------------------------------------------------------------------------
    def role_of(self, global_rank: int) -> Role:
        if isinstance(global_rank, bool) or not isinstance(global_rank, int) \
                or not 0 <= global_rank < self.world_size:
            raise TopologyError(
                f"global rank {global_rank!r} is outside 0..world_size-1 = 0..{self.world_size - 1}")
        return self.roles[global_rank]

    def policy_ranks(self) -> list[int]:
        """Global ranks of the policy, in policy-index order."""
        return [r.global_rank for r in sorted((r for r in self.roles if r.is_policy), key=lambda r: r.index)]

    def reference_ranks(self) -> list[int]:
        """Global ranks of the reference, ordered by (replica, stage)."""
        refs = [r for r in self.roles if r.is_reference]
        return [r.global_rank for r in sorted(refs, key=lambda r: (r.replica, r.stage))]

    def _need_reference(self, what: str) -> None:
        if not self.live:
            raise TopologyError(f"{what}: there is no reference group (reference_ranks=0, cache mode)")

    def stage_ranks(self, replica: int) -> list[int]:
        """Global ranks of one replica's stages, stage 0 first."""
        self._need_reference(f"stage_ranks({replica})")
        if not 0 <= replica < self.num_replicas:
            raise TopologyError(f"replica={replica} is outside 0..num_replicas-1 = 0..{self.num_replicas - 1}")
        refs = [r for r in self.roles if r.is_reference and r.replica == replica]
        return [r.global_rank for r in sorted(refs, key=lambda r: r.stage)]

    def reference_for_policy(self, policy_index: int) -> int:
        """The replica serving policy rank ``policy_index``: round-robin, policy_index % num_replicas.
        Replicas serve floor or ceil(num_policy / num_replicas) policy ranks each."""
        self._need_reference(f"reference_for_policy({policy_index})")
        if not 0 <= policy_index < self.num_policy:
            raise TopologyError(
                f"policy_index={policy_index} is outside 0..num_policy-1 = 0..{self.num_policy - 1}")
        return policy_index % self.num_replicas

    def policies_for_replica(self, replica: int) -> list[int]:
        """Policy indices served by ``replica`` (inverse of `reference_for_policy`)."""
        self._need_reference(f"policies_for_replica({replica})")
        if not 0 <= replica < self.num_replicas:
            raise TopologyError(f"replica={replica} is outside 0..num_replicas-1 = 0..{self.num_replicas - 1}")
        return list(range(replica, self.num_policy, self.num_replicas))

    def node_of(self, global_rank: int, launch: LaunchEnv | None = None) -> int | None:
        """Node index of a global rank (block placement), or None when it cannot be known."""
        if self.ranks_per_node:
            return global_rank // self.ranks_per_node
        if launch is not None:
            return launch.node_of(global_rank)
        return None

    # -- environments ----------------------------------------------------------------------
    def ports(self, launch: LaunchEnv) -> dict[str, int]:
        """Port of each world: policy, reference, bridge (see the module docstring)."""
        shift = 1 if launch.agent_store else 0
        base = launch.master_port + shift
        out = {"policy": base + POLICY_PORT_OFFSET, "reference": base + REFERENCE_PORT_OFFSET,
               "bridge": base + BRIDGE_PORT_OFFSET}
        if max(out.values()) > 65535:
            raise TopologyError(
                f"MASTER_PORT={launch.master_port}: the bridge needs port {out['bridge']} > 65535; "
                f"use MASTER_PORT <= {65535 - BRIDGE_PORT_OFFSET - shift}")
        return out

    def bridge_address(self, launch: LaunchEnv) -> tuple[str, int]:
        """(addr, port) of the bridge store: global rank 0's host (the launch's MASTER_ADDR)."""
        return launch.master_addr, self.ports(launch)["bridge"]

    def role_master_addr(self, kind: str, launch: LaunchEnv) -> str:
        """Host of rank 0 of the ``kind`` world: the launch's MASTER_ADDR when that rank shares
        node 0 with global rank 0 (always for the policy; any single-node launch), else
        ``launch.hosts[node]`` with the node from ranks_per_node (or the launch's tasks per node)."""
        if kind == "policy" or launch.num_nodes == 1:
            return launch.master_addr  # policy rank 0 is global rank 0 in every placement
        self._need_reference("role_master_addr('reference')")
        first = self.reference_ranks()[0]  # replica 0, stage 0 = reference rank 0
        node = self.node_of(first, launch)
        host = launch.host_of_node(node) if node is not None else None
        if host is None:
            raise TopologyError(
                f"cannot tell the host of reference rank 0 (global rank {first}, node "
                f"{'unknown' if node is None else node}) on a {launch.num_nodes}-node {launch.launcher} "
                f"launch: known hosts are {list(launch.hosts) or 'none'}. Set {HOSTS_VAR} to the node "
                f"host names in node-rank order, launch under srun, or pass master_addr= "
                f"(e.g. published through the bridge store)")
        return host

    def role_env(self, global_rank: int, launch: LaunchEnv, *, master_addr: str | None = None) -> dict[str, str]:
        """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT for the
        world of ``global_rank``'s role (plus TORCHELASTIC_USE_AGENT_STORE=False under torchrun in
        live mode). ``master_addr`` overrides the computed host of the role's rank 0."""
        if launch.world_size != self.world_size:
            raise TopologyError(
                f"the topology was built for world_size={self.world_size} but the launch has "
                f"world_size={launch.world_size}")
        role = self.role_of(global_rank)
        if not self.live:
            return {"RANK": str(global_rank), "WORLD_SIZE": str(launch.world_size),
                    "LOCAL_RANK": str(launch.local_rank), "LOCAL_WORLD_SIZE": str(launch.local_world_size),
                    "MASTER_ADDR": master_addr or launch.master_addr, "MASTER_PORT": str(launch.master_port)}
        env = {
            "RANK": str(role.role_rank),
            "WORLD_SIZE": str(role.role_world_size),
            "LOCAL_RANK": str(launch.local_rank),
            "LOCAL_WORLD_SIZE": str(launch.local_world_size),
            "MASTER_ADDR": master_addr or self.role_master_addr(role.kind, launch),
            "MASTER_PORT": str(self.ports(launch)[role.kind]),
        }
        if launch.agent_store:
            env["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        return env

    def process_env(self, global_rank: int, launch: LaunchEnv, env: Mapping[str, str] | None = None, *,
                    master_addr: str | None = None) -> dict[str, str]:
        """The full rewritten environment for this process: `apply_role_env` plus SPARSEPO_ROLE,
        SPARSEPO_STAGE / SPARSEPO_REPLICA (reference), SPARSEPO_BRIDGE_ADDR / SPARSEPO_BRIDGE_PORT."""
        env = os.environ if env is None else env
        role = self.role_of(global_rank)
        out = apply_role_env(env, self.role_env(global_rank, launch, master_addr=master_addr), launch)
        for key in ("SPARSEPO_STAGE", "SPARSEPO_REPLICA"):
            out.pop(key, None)
        out["SPARSEPO_ROLE"] = role.kind
        if role.is_reference:
            out["SPARSEPO_STAGE"] = str(role.stage)
            out["SPARSEPO_REPLICA"] = str(role.replica)
        addr, port = self.bridge_address(launch)
        out["SPARSEPO_BRIDGE_ADDR"] = addr
        out["SPARSEPO_BRIDGE_PORT"] = str(port)
        return out

    # -- logs ------------------------------------------------------------------------------
    def describe(self, launch: LaunchEnv | None = None) -> str:
        """A readable rank -> role table, for logs."""
        if self.live:
            head = (f"topology: world_size={self.world_size} = {self.num_policy} policy + "
                    f"{self.num_reference} reference ({self.num_replicas} replica(s) x "
                    f"{self.num_stages} stage(s)), placement={self.placement}")
        else:
            head = f"topology: world_size={self.world_size}, all policy (no reference group: cache mode)"
        if self.ranks_per_node:
            head += f", ranks_per_node={self.ranks_per_node}"
        rows = [("rank", "node", "role", "role_rank", "stage", "replica", "link")]
        for r in self.roles:
            node = self.node_of(r.global_rank, launch)
            node_s = "?" if node is None else str(node)
            if r.is_policy:
                link = f"-> replica {self.reference_for_policy(r.index)}" if self.live else ""
                rows.append((str(r.global_rank), node_s, "policy", f"{r.role_rank}/{r.role_world_size}",
                             "-", "-", link))
            else:
                parts = []
                if r.is_first_stage:
                    parts.append("first stage")
                if r.is_last_stage:
                    parts.append("last stage")
                if r.stage == 0:
                    served = self.policies_for_replica(r.replica)
                    parts.append("serves policy " + ",".join(map(str, served)))
                rows.append((str(r.global_rank), node_s, "reference", f"{r.role_rank}/{r.role_world_size}",
                             f"{r.stage}/{r.num_stages}", f"{r.replica}/{r.num_replicas}", "; ".join(parts)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Rewriting a process environment
# --------------------------------------------------------------------------------------------

def apply_role_env(env: Mapping[str, str], role_env: Mapping[str, str],
                   launch: LaunchEnv | None = None) -> dict[str, str]:
    """A copy of ``env`` with ``role_env`` applied and the global identity kept as SPARSEPO_GLOBAL_*
    (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, NUM_NODES, MASTER_ADDR, MASTER_PORT,
    LAUNCHER, HOSTS, TASKS_PER_NODE, AGENT_STORE). Idempotent: when ``env`` already holds
    SPARSEPO_GLOBAL_RANK, those originals are kept. ``env`` itself is never modified."""
    out = dict(env)
    if not str(out.get(GLOBAL_PREFIX + "RANK", "")).strip():
        original = launch if launch is not None else LaunchEnv.from_environ(env)
        out.update(original.to_global_env())
    out.update({k: str(v) for k, v in role_env.items()})
    return out


@dataclass(frozen=True)
class ProcessPlan:
    """Everything one process needs before DeepSpeed starts."""

    launch: LaunchEnv
    topology: Topology
    role: Role
    env: dict[str, str]
    bridge: tuple[str, int]


def plan(cfg: "TopologyConfig | Any", env: Mapping[str, str] | None = None, *,
         num_layers: int | None = None, master_addr: str | None = None) -> ProcessPlan:
    """Read the launch from ``env`` (default os.environ; a rewritten process is read through its
    SPARSEPO_GLOBAL_* variables), build and check the topology, and compute the rewritten
    environment. Pure: applies nothing; do ``os.environ.update(p.env)`` yourself."""
    env = os.environ if env is None else env
    launch = global_launch_env(env)
    topo = Topology.from_launch(cfg, launch, num_layers=num_layers)
    new_env = topo.process_env(launch.rank, launch, env, master_addr=master_addr)
    return ProcessPlan(launch=launch, topology=topo, role=topo.role_of(launch.rank), env=new_env,
                       bridge=topo.bridge_address(launch))
