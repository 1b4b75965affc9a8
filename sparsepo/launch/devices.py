"""Which GPU each process uses, and which backend each role's world takes. Pure stdlib arithmetic.

    topology.device_map: "0,0"   # a one-GPU workstation: policy (local rank 0) and reference (1) on GPU 0

A process's device is ``device_map[local_rank]`` (default: its LOCAL_RANK, one process per GPU).
DeepSpeed picks its device from LOCAL_RANK (engine, zero.Init, PipelineModule), so the role
environment sets LOCAL_RANK to that device index, chosen by configuration; the launch's own local
rank stays in SPARSEPO_GLOBAL_LOCAL_RANK. NCCL refuses two ranks of one communicator on one GPU,
so a world whose processes each own a device runs NCCL and a world with two processes on one
device runs gloo (`backend_for`). Roles sharing a GPU is fine: the policy and the reference are
different worlds. Processes are assumed placed in blocks of LOCAL_WORLD_SIZE per node (deepspeed,
torchrun, srun --ntasks-per-node).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.launch.topology import Topology, TopologyError

SHARED_VAR = "SPARSEPO_DEVICE_SHARED"


def parse_device_map(text: str | None, local_world_size: int) -> tuple[int, ...] | None:
    """"0,0,1" -> (0, 0, 1): one GPU index per local rank; None/"" -> None (device = LOCAL_RANK)."""
    if text is None or not str(text).strip():
        return None
    try:
        devices = tuple(int(x) for x in str(text).replace(" ", "").split(","))
    except ValueError:
        raise TopologyError(f"topology.device_map={text!r} must be comma-separated GPU indices, e.g. \"0,0\"") from None
    if len(devices) != local_world_size or min(devices) < 0:
        raise TopologyError(f"topology.device_map={text!r} names {len(devices)} device(s) but this launch has "
                            f"{local_world_size} process(es) per node: give one GPU index (>= 0) per local rank")
    return devices


def device_of(local_rank: int, device_map: tuple[int, ...] | None) -> int:
    return local_rank if device_map is None else device_map[local_rank]


@dataclass(frozen=True)
class DevicePlan:
    device: int  # this process's GPU index on its node (its role's LOCAL_RANK)
    shared: bool  # another process of the same world uses the same GPU (NCCL cannot run there)


def device_plan(topo: Topology, global_rank: int, local_world_size: int,
                device_map: tuple[int, ...] | None) -> DevicePlan:
    """This process's device, and whether its world (policy ranks, or the reference group) puts
    two processes on one (node, device)."""
    role = topo.role_of(global_rank)
    members = topo.policy_ranks() if role.is_policy else topo.reference_ranks()
    placed = [(g // local_world_size, device_of(g % local_world_size, device_map)) for g in members]
    return DevicePlan(device=device_of(global_rank % local_world_size, device_map),
                      shared=len(set(placed)) < len(placed))


def backend_for(*, cuda: bool, shared: bool) -> str:
    """NCCL for CUDA tensors where each process of the world owns its GPU, with gloo beside it for the
    host-side collectives the loop makes on CPU tensors (metrics' all-reduce, the preemption flag: an
    NCCL-only group refuses CPU tensors once a world has 2+ ranks); gloo alone on CPU or a shared GPU."""
    return "cpu:gloo,cuda:nccl" if cuda and not shared else "gloo"


def check_device_index(device: int, gpu_count: int, local_rank: int) -> None:
    """Refuse a device this node does not have, naming the fix."""
    if not 0 <= device < gpu_count:
        raise TopologyError(f"local rank {local_rank} maps to GPU {device} but this node has {gpu_count} GPU(s): "
                            f"start at most {gpu_count} process(es) per node, or share GPUs with "
                            f"topology.device_map (e.g. \"{','.join(['0'] * max(2, local_rank + 1))}\" puts "
                            f"every process on GPU 0)")
