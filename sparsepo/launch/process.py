"""Each process's environment for its role's own world, before DeepSpeed starts.

    p = plan(cfg.topology, os.environ, num_layers=n)   # pure: reads the launch, builds the topology
    os.environ.update(p.env)                           # then deepspeed / torch.distributed start

Pure stdlib, no torch import. DeepSpeed assumes it owns the whole ``torch.distributed`` world, so
each role gets its own:

* policy: RANK = policy index (0..P-1, in global-rank order), WORLD_SIZE = P.
* reference: WORLD_SIZE = R*S and RANK = stage * R + replica (DeepSpeed's pipe-major order, see
  `sparsepo.launch.topology`).
* LOCAL_WORLD_SIZE stays the launch's; LOCAL_RANK is the device index: the launch's local rank, or
  ``topology.device_map[local rank]`` in live mode (roles sharing a GPU, `sparsepo.launch.devices`),
  with SPARSEPO_DEVICE_SHARED=1 when two processes of the same world share one (gloo there).
  DeepSpeed's CPU accelerator also reads LOCAL_SIZE, which is left alone.
* MASTER_ADDR is the host of the role's rank 0 (the launch's MASTER_ADDR for the policy, whose rank
  0 is global rank 0; for the reference: ``hosts[node_of(first reference rank)]``).
* MASTER_PORT: the policy, reference and bridge ports of `sparsepo.launch.ports.role_ports`; under
  torchrun the role env also sets TORCHELASTIC_USE_AGENT_STORE=False so rank 0 of each role hosts
  its own store.
* The **bridge** spans all W processes with their *global* ranks (a TCPStore on the launch's
  MASTER_ADDR, which hosts global rank 0, plus a gloo group): `bridge_address`.
* The launch's own identity is kept as SPARSEPO_GLOBAL_* (`apply_role_env`), so a rewritten process
  can still be planned again (`global_launch_env`).

With reference_ranks == 0 (cache mode) every rank is a policy rank and `role_env` is exactly the
launch's environment (same port, agent store untouched).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from sparsepo.launch.environ import GLOBAL_PREFIX, HOSTS_VAR, LaunchEnv, global_launch_env
from sparsepo.launch.ports import role_ports
from sparsepo.launch.devices import SHARED_VAR, device_plan, parse_device_map
from sparsepo.launch.topology import Role, Topology, TopologyError, _cfg_value

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from sparsepo.config import TopologyConfig

__all__ = ["ProcessPlan", "apply_role_env", "bridge_address", "plan", "process_env", "role_env",
           "role_master_addr", "world_ports"]


def world_ports(topo: Topology, launch: LaunchEnv) -> dict[str, int]:
    """Port of each world - policy, reference, bridge - from the launch's MASTER_PORT (`role_ports`)."""
    return role_ports(launch.master_port, agent_store=launch.agent_store)


def bridge_address(topo: Topology, launch: LaunchEnv) -> tuple[str, int]:
    """(addr, port) of the bridge store: global rank 0's host (the launch's MASTER_ADDR)."""
    return launch.master_addr, world_ports(topo, launch)["bridge"]


def role_master_addr(topo: Topology, kind: str, launch: LaunchEnv) -> str:
    """Host of rank 0 of the ``kind`` world: the launch's MASTER_ADDR when that rank shares
    node 0 with global rank 0 (always for the policy; any single-node launch), else
    ``launch.hosts[node]`` with the node from ranks_per_node (or the launch's tasks per node)."""
    if kind == "policy" or launch.num_nodes == 1:
        return launch.master_addr  # policy rank 0 is global rank 0 in every placement
    if not topo.live:
        raise TopologyError(
            "role_master_addr('reference'): there is no reference group (reference_ranks=0, cache mode)")
    first = topo.reference_ranks()[0]  # replica 0, stage 0 = reference rank 0
    node = topo.node_of(first, launch)
    host = launch.host_of_node(node) if node is not None else None
    if host is None:
        raise TopologyError(
            f"cannot tell the host of reference rank 0 (global rank {first}, node "
            f"{'unknown' if node is None else node}) on a {launch.num_nodes}-node {launch.launcher} "
            f"launch: known hosts are {list(launch.hosts) or 'none'}. Set {HOSTS_VAR} to the node "
            f"host names in node-rank order, launch under srun, or pass master_addr= "
            f"(e.g. published through the bridge store)")
    return host


def role_env(topo: Topology, global_rank: int, launch: LaunchEnv, *, master_addr: str | None = None) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT for the
    world of ``global_rank``'s role (plus TORCHELASTIC_USE_AGENT_STORE=False under torchrun in
    live mode). ``master_addr`` overrides the computed host of the role's rank 0."""
    if launch.world_size != topo.world_size:
        raise TopologyError(
            f"the topology was built for world_size={topo.world_size} but the launch has "
            f"world_size={launch.world_size}")
    role = topo.role_of(global_rank)
    if not topo.live:
        return {"RANK": str(global_rank), "WORLD_SIZE": str(launch.world_size),
                "LOCAL_RANK": str(launch.local_rank), "LOCAL_WORLD_SIZE": str(launch.local_world_size),
                "MASTER_ADDR": master_addr or launch.master_addr, "MASTER_PORT": str(launch.master_port)}
    env = {
        "RANK": str(role.role_rank),
        "WORLD_SIZE": str(role.role_world_size),
        "LOCAL_RANK": str(launch.local_rank),
        "LOCAL_WORLD_SIZE": str(launch.local_world_size),
        "MASTER_ADDR": master_addr or role_master_addr(topo, role.kind, launch),
        "MASTER_PORT": str(world_ports(topo, launch)[role.kind]),
    }
    if launch.agent_store:
        env["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    return env


def process_env(topo: Topology, global_rank: int, launch: LaunchEnv, env: Mapping[str, str] | None = None, *,
                master_addr: str | None = None) -> dict[str, str]:
    """The full rewritten environment for this process: `apply_role_env` plus SPARSEPO_ROLE,
    SPARSEPO_STAGE / SPARSEPO_REPLICA (reference), SPARSEPO_BRIDGE_ADDR / SPARSEPO_BRIDGE_PORT."""
    env = os.environ if env is None else env
    role = topo.role_of(global_rank)
    out = apply_role_env(env, role_env(topo, global_rank, launch, master_addr=master_addr), launch)
    for key in ("SPARSEPO_STAGE", "SPARSEPO_REPLICA"):
        out.pop(key, None)
    out["SPARSEPO_ROLE"] = role.kind
    if role.is_reference:
        out["SPARSEPO_STAGE"] = str(role.stage)
        out["SPARSEPO_REPLICA"] = str(role.replica)
    addr, port = bridge_address(topo, launch)
    out["SPARSEPO_BRIDGE_ADDR"] = addr
    out["SPARSEPO_BRIDGE_PORT"] = str(port)
    return out


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


@dataclass(frozen=True, kw_only=True)
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
    new_env = process_env(topo, launch.rank, launch, env, master_addr=master_addr)
    if topo.live:  # LOCAL_RANK becomes this process's GPU (topology.device_map; DeepSpeed reads LOCAL_RANK)
        dev = device_plan(topo, launch.rank, launch.local_world_size,
                          parse_device_map(_cfg_value(cfg, "device_map", None), launch.local_world_size))
        new_env.update({"LOCAL_RANK": str(dev.device), SHARED_VAR: "1" if dev.shared else "0"})
    return ProcessPlan(launch=launch, topology=topo, role=topo.role_of(launch.rank), env=new_env,
                       bridge=bridge_address(topo, launch))
