"""sparsepo.launch.devices: roles sharing GPUs by configuration, and the backend each world takes.
Pure: the env a one-GPU workstation's live run gets, without a GPU."""

import pytest

from sparsepo.config import TopologyConfig
from sparsepo.launch.devices import backend_for, check_device_index, device_plan, parse_device_map
from sparsepo.launch.process import plan
from sparsepo.launch.topology import Topology, TopologyError

pytestmark = pytest.mark.unit
NCCL = "cpu:gloo,cuda:nccl"  # NCCL for CUDA tensors, gloo for the loop's CPU-tensor collectives


def test_the_nccl_backend_string_parses_into_both_devices():
    import torch.distributed as dist

    assert dist.BackendConfig(dist.Backend(NCCL)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def torchrun(rank: int, world: int, local_world: int | None = None) -> dict:
    local_world = local_world or world
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % local_world),
            "LOCAL_WORLD_SIZE": str(local_world), "GROUP_RANK": str(rank // local_world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True"}


def test_one_gpu_workstation_policy_and_reference_on_gpu0_each_world_on_nccl():
    """`torchrun --nproc_per_node 2` on one GPU, live mode, device_map 0,0: both processes see
    LOCAL_RANK=0 (DeepSpeed's device), each world has one process on it -> not shared -> NCCL."""
    c = TopologyConfig(reference_ranks=1, device_map="0,0")
    envs = [plan(c, torchrun(g, 2), num_layers=2).env for g in range(2)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0"]
    assert [e["SPARSEPO_GLOBAL_LOCAL_RANK"] for e in envs] == ["0", "1"]  # the launch's own, kept
    assert [e["SPARSEPO_DEVICE_SHARED"] for e in envs] == ["0", "0"]
    assert [backend_for(cuda=True, shared=e["SPARSEPO_DEVICE_SHARED"] == "1") for e in envs] == [NCCL, NCCL]
    # replanning from the rewritten environment gives the same answer (the launcher may plan twice)
    assert [plan(c, e, num_layers=2).env for e in envs] == envs


def test_default_is_one_gpu_per_local_rank():
    c = TopologyConfig(reference_ranks=2, pipeline_stages=2)
    envs = [plan(c, torchrun(g, 4), num_layers=2).env for g in range(4)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"] and {e["SPARSEPO_DEVICE_SHARED"] for e in envs} == {"0"}


def test_a_world_with_two_processes_on_one_gpu_runs_gloo():
    """Policy on GPU 0, a 2-stage reference pipeline with both stages on GPU 1: the reference world
    shares a device (NCCL refuses that), the policy world does not."""
    topo = Topology.build(TopologyConfig(reference_ranks=2, pipeline_stages=2), 3, num_layers=2)
    dmap = parse_device_map("0,1,1", 3)
    plans = [device_plan(topo, g, 3, dmap) for g in range(3)]
    assert [p.device for p in plans] == [0, 1, 1]
    assert [p.shared for p in plans] == [False, True, True]
    assert [backend_for(cuda=True, shared=p.shared) for p in plans] == [NCCL, "gloo", "gloo"]
    assert backend_for(cuda=False, shared=False) == "gloo"


def test_same_device_index_on_two_nodes_is_not_shared():
    """Two nodes of 2 processes, device_map 0,1: global 1 and 3 both use GPU 1, on different nodes."""
    topo = Topology.build(TopologyConfig(reference_ranks=2), 4, ranks_per_node=2)
    plans = [device_plan(topo, g, 2, parse_device_map("0,1", 2)) for g in range(4)]
    assert [p.device for p in plans] == [0, 1, 0, 1] and not any(p.shared for p in plans)


@pytest.mark.parametrize("text, n, needle", [("0", 2, "names 1 device"), ("a,b", 2, "comma-separated"),
                                             ("0,-1", 2, ">= 0")])
def test_bad_device_maps_are_refused(text, n, needle):
    with pytest.raises(TopologyError, match=needle):
        parse_device_map(text, n)


def test_a_missing_gpu_names_the_fix():
    check_device_index(0, 1, 0)
    with pytest.raises(TopologyError, match=r"GPU 1 but this node has 1 GPU.*topology.device_map"):
        check_device_index(1, 1, 1)
