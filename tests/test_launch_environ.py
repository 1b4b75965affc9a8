"""sparsepo.launch.environ (and .hostlist): every launcher's environment read by the one parser. Pure."""

import subprocess
import sys

import pytest

from launch_envs import DEEPSPEED, OMPI, SLURM, TORCHRUN
from sparsepo.launch.environ import LaunchEnv, expand_hostlist, parse_tasks_per_node
from sparsepo.launch.ports import DEFAULT_MASTER_PORT
from sparsepo.launch.topology import TopologyError

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------------
# Slurm strings
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,hosts", [
    ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
    ("a1,b[01-02]", ["a1", "b01", "b02"]),
    ("n[001-003]", ["n001", "n002", "n003"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("gpu-[1-2]-ib", ["gpu-1-ib", "gpu-2-ib"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("node1", ["node1"]),
    ("node[7]", ["node7"]),
    ("x[1-2],y,z[10-11]", ["x1", "x2", "y", "z10", "z11"]),
    ("", []),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text,needle", [("node[1-3", "without a matching ']'"), ("node1-3]", "without a matching '['"),
                                         ("node[3-1]", "runs backwards (1 < 3)"), ("node[a]", "is not N or N-M"),
                                         ("n[[1]]", "nested")])
def test_expand_hostlist_refuses(text, needle):
    with pytest.raises(TopologyError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        expand_hostlist(text)


@pytest.mark.parametrize("text,counts", [("2(x2)", [2, 2]), ("3,2(x2)", [3, 2, 2]), ("4", [4]),
                                         ("1(x3),2", [1, 1, 1, 2]), ("", [])])
def test_parse_tasks_per_node(text, counts):
    assert parse_tasks_per_node(text) == counts


def test_parse_tasks_per_node_refuses():
    with pytest.raises(TopologyError, match=r"SLURM_TASKS_PER_NODE='2\(x\)'"):
        parse_tasks_per_node("2(x)")


# ------------------------------------------------------------------------------------------
# Launch environments
# ------------------------------------------------------------------------------------------

def test_launch_torchrun():
    e = LaunchEnv.from_environ(TORCHRUN)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("torchrun", 5, 8, 1, 4)
    assert (e.node_rank, e.num_nodes, e.master_addr, e.master_port) == (1, 2, "10.0.0.1", 29400)
    assert e.agent_store and e.ranks_per_node == 4 and e.tasks_per_node == (4, 4)


def test_launch_deepspeed():
    e = LaunchEnv.from_environ(DEEPSPEED)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("deepspeed", 3, 4, 3, 4)
    assert (e.node_rank, e.num_nodes, e.master_port, e.agent_store) == (0, 1, 29500, False)


def test_launch_slurm():
    e = LaunchEnv.from_environ(SLURM)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("slurm", 6, 8, 2, 4)
    assert (e.node_rank, e.num_nodes) == (1, 2)
    assert e.hosts == ("node1", "node2") and e.master_addr == "node1"
    assert e.master_port == 20000 + 123457 % 10000 == 23457
    assert e.tasks_per_node == (4, 4) and e.ranks_per_node == 4


def test_launch_slurm_env_overrides_and_step_variables():
    e = LaunchEnv.from_environ({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "30000",
                                "SLURM_STEP_NODELIST": "node[2-3]"})
    assert (e.master_addr, e.master_port, e.hosts) == ("head", 30000, ("node2", "node3"))


def test_launch_slurm_uneven_nodes():
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "4", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_NNODES": "3", "SLURM_TASKS_PER_NODE": "3,2(x2)",
           "SLURM_JOB_NODELIST": "gpu[01-03]"}
    e = LaunchEnv.from_environ(env)
    assert e.local_world_size == 2 and e.tasks_per_node == (3, 2, 2) and e.ranks_per_node is None
    assert [e.node_of(g) for g in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert e.master_port == 20009 and e.master_addr == "gpu01"


def test_launch_slurm_ntasks_per_node_only():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2"}
    e = LaunchEnv.from_environ(env)
    assert (e.local_world_size, e.tasks_per_node, e.master_addr, e.master_port) == \
        (2, (2, 2), "127.0.0.1", DEFAULT_MASTER_PORT)


def test_launch_mpi():
    e = LaunchEnv.from_environ(OMPI)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("mpi", 3, 4, 1, 2)
    assert (e.node_rank, e.num_nodes) == (1, 2)
    assert e.master_addr == "127.0.0.1"  # loopback, not `hostname -I`
    assert e.master_port == DEFAULT_MASTER_PORT


def test_launch_pmi_fallback():
    e = LaunchEnv.from_environ({"PMI_RANK": "2", "PMI_SIZE": "3", "MASTER_PORT": "1234"})
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_port) == \
        ("mpi", 2, 3, 0, 3, 1234)


def test_launch_single():
    e = LaunchEnv.from_environ({})
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("single", 0, 1, 0, 1)
    assert (e.master_addr, e.master_port, e.num_nodes) == ("127.0.0.1", DEFAULT_MASTER_PORT, 1)


def test_explicit_rank_wins_over_slurm():
    # torchrun under srun: one torchrun per node, so SLURM_PROCID is the node, RANK the process
    env = {**SLURM, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1(x2)",
           **{k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR": "node1"}
    e = LaunchEnv.from_environ(env)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size) == ("torchrun", 5, 8, 1, 4)
    assert e.hosts == ("node1", "node2") and e.node_rank == 1


def test_hand_exported_rank_under_srun_takes_the_rest_from_slurm():
    env = {**SLURM, "RANK": "6", "WORLD_SIZE": "8", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    e = LaunchEnv.from_environ(env)
    assert (e.launcher, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes) == ("torchrun", 2, 4, 1, 2)


def test_mpirun_inside_slurm_allocation_trusts_mpi():
    # mpirun's daemons are started by srun: SLURM_PROCID is the daemon's, OMPI_* the rank's
    env = {**SLURM, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", **OMPI}
    e = LaunchEnv.from_environ(env)
    assert (e.launcher, e.rank, e.world_size) == ("mpi", 3, 4)
    assert e.master_addr == "node1" and e.master_port == 23457  # allocation's first host and job port


def test_srun_with_pmi_is_slurm():
    env = {**SLURM, "PMI_RANK": "6", "PMI_SIZE": "8"}
    assert LaunchEnv.from_environ(env).launcher == "slurm"
    env = {**SLURM, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "PMI_RANK": "6", "PMI_SIZE": "8"}
    e = LaunchEnv.from_environ(env)  # Hydra mpiexec under Slurm
    assert (e.launcher, e.rank, e.world_size) == ("mpi", 6, 8)


def test_sparsepo_hosts_for_any_launcher():
    e = LaunchEnv.from_environ({**OMPI, "SPARSEPO_HOSTS": "h[0-1]"})
    assert e.hosts == ("h0", "h1") and e.master_addr == "h0"


@pytest.mark.parametrize("env,needle", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank=4 is outside 0..world_size-1 = 0..3"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4"}, "local_rank=4 is outside"),
    ({"RANK": "0", "WORLD_SIZE": "4", "MASTER_PORT": "70000"}, "master_port=70000 is not a TCP port"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-"}, "without a matching"),
])
def test_launch_refusals(env, needle):
    with pytest.raises(TopologyError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        LaunchEnv.from_environ(env)


def test_from_environ_defaults_to_os_environ(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "OMPI_", "PMI_", "LOCAL_", "MASTER_", "SPARSEPO_")):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert LaunchEnv.from_environ().rank == 1


def test_module_is_pure():
    code = "import sys, sparsepo.launch; assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
