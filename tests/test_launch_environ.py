"""sparsepo.launch.environ (and .hostlist): every launcher's environment read by the one parser. Pure."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch_envs import DEEPSPEED, OMPI, SLURM, TORCHRUN
from sparsepo.launch.__main__ import shell_env, tasks_on_node
from sparsepo.launch.environ import (LaunchEnv, expand_hostlist, launch_mode, master_port_from,
                                     parse_tasks_per_node, torch_dist_env)
from sparsepo.launch.ports import DEFAULT_MASTER_PORT, free_port, job_port, role_ports
from sparsepo.launch.topology import TopologyError

REPO = Path(__file__).resolve().parent.parent

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


# ------------------------------------------------------------------------------------------
# One parser for every launcher, one port rule (also what launch.sh exports)
# ------------------------------------------------------------------------------------------

def test_hostlist_and_tasks_per_node_of_the_brief():
    assert expand_hostlist("node[01-03,07],gpu-a[1-2]") == ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


SRUN_UNEVEN = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "6", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "7",
               "SLURM_LOCALID": "0", "SLURM_NODEID": "3", "SLURM_NNODES": "4",
               "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NODELIST": "node[01-03,07]"}
SRUN_TWO_RACKS = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "6",
                  "SLURM_LOCALID": "0", "SLURM_NODEID": "5", "SLURM_TASKS_PER_NODE": "1(x6)",
                  "SLURM_JOB_NODELIST": "node[01-03,07],gpu-a[1-2]"}
OMPI_JOB = {**OMPI, "OMPI_MCA_ess_base_jobid": "1082982401"}

# env -> (launcher, rank, world, local_rank, local_size, node_rank, master_addr, master_port)
EVERY_LAUNCHER = [
    ("deepspeed", DEEPSPEED, ("deepspeed", 3, 4, 3, 4, 0, "127.0.0.1", 29500)),
    ("torchrun", TORCHRUN, ("torchrun", 5, 8, 1, 4, 1, "10.0.0.1", 29400)),
    ("srun", SLURM, ("slurm", 6, 8, 2, 4, 1, "node1", 23457)),
    ("srun uneven", SRUN_UNEVEN, ("slurm", 6, 7, 0, 1, 3, "node01", 24242)),
    ("srun two racks", SRUN_TWO_RACKS, ("slurm", 5, 6, 0, 1, 5, "node01", 20077)),
    ("mpirun", OMPI, ("mpi", 3, 4, 1, 2, 1, "127.0.0.1", DEFAULT_MASTER_PORT)),
    ("mpirun with job id", OMPI_JOB, ("mpi", 3, 4, 1, 2, 1, "127.0.0.1", 20000 + 1082982401 % 10000)),
    ("mpirun in an allocation", {**SLURM, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", **OMPI_JOB},
     ("mpi", 3, 4, 1, 2, 1, "node1", 23457)),  # Slurm's job id first: every rank sees both
    ("single", {}, ("single", 0, 1, 0, 1, 0, "127.0.0.1", DEFAULT_MASTER_PORT)),
]


@pytest.mark.parametrize("name,env,want", EVERY_LAUNCHER, ids=[c[0] for c in EVERY_LAUNCHER])
def test_every_launcher_through_the_one_parser(name, env, want):
    e = LaunchEnv.from_environ(env)
    got = (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.master_addr,
           e.master_port)
    assert got == want
    assert e.master_port == master_port_from(env)


def test_srun_hostlists_name_every_node():
    uneven = LaunchEnv.from_environ(SRUN_UNEVEN)
    assert uneven.tasks_per_node == (2, 2, 2, 1) and uneven.hosts == ("node01", "node02", "node03", "node07")
    assert [uneven.node_of(g) for g in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert uneven.host_of_node(3) == "node07"
    racks = LaunchEnv.from_environ(SRUN_TWO_RACKS)
    assert racks.hosts == ("node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2")
    assert racks.host_of_node(4) == "gpu-a1" and racks.num_nodes == 6


@pytest.mark.parametrize("name,env,want", EVERY_LAUNCHER, ids=[c[0] for c in EVERY_LAUNCHER])
def test_torch_dist_env_for_every_launcher(name, env, want):
    launcher, rank, world, local_rank, local_size, _, addr, port = want
    got = torch_dist_env(env, lone_port=lambda: 45678)
    lone = launcher == "single"
    node = LaunchEnv.from_environ(env)
    assert got == {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                   "LOCAL_WORLD_SIZE": str(local_size), "LOCAL_SIZE": str(local_size),
                   "CROSS_RANK": str(node.node_rank), "CROSS_SIZE": str(node.num_nodes), "MASTER_ADDR": addr,
                   "MASTER_PORT": "45678" if lone else str(port)}
    # the shell gets exactly these (python -m sparsepo.launch --print-env under srun / mpirun)
    if launch_mode(env) != "local":
        assert shell_env(env)[1:] == [f"export {k}={v}" for k, v in torch_dist_env(env).items()]


def test_port_rule_order():
    assert master_port_from({"MASTER_PORT": "31337", "SLURM_JOB_ID": "5", "OMPI_MCA_ess_base_jobid": "6"}) == 31337
    assert master_port_from({"SLURM_JOB_ID": "123456", "OMPI_MCA_ess_base_jobid": "6"}) == 23456
    assert master_port_from({"SLURM_JOBID": "19999"}) == 29999
    assert master_port_from({"OMPI_MCA_ess_base_jobid": "30007"}) == 20007
    assert master_port_from({}) == DEFAULT_MASTER_PORT == 29500
    assert job_port(10000) == 20000 and job_port(9999) == 29999
    with pytest.raises(TopologyError, match="SLURM_JOB_ID='x' is not an integer"):
        master_port_from({"SLURM_JOB_ID": "x"})


def test_lone_process_takes_a_free_port_unless_told():
    ports = {int(torch_dist_env({})["MASTER_PORT"]) for _ in range(3)}
    assert all(0 < p < 65536 for p in ports)
    with socket.socket() as s:  # a port free_port hands out can be bound right away
        s.bind(("127.0.0.1", free_port()))
    assert torch_dist_env({"MASTER_PORT": "29611"}, lone_port=lambda: 1)["MASTER_PORT"] == "29611"
    assert torch_dist_env({}, lone_port=lambda: 40001)["MASTER_PORT"] == "40001"


def test_free_port_lies_below_the_ephemeral_range_with_its_role_ports_free():
    """The kernel hands ephemeral ports to outgoing connections: a port chosen there could be taken
    by one of the job's own connections before the master binds it (EADDRINUSE, seen in a live test).
    free_port draws base .. base+3 from FREE_PORT_MIN up to the ephemeral range, all bindable."""
    from sparsepo.launch.ports import FREE_PORT_MIN, ROLE_PORTS, _ephemeral_low

    for _ in range(5):
        base = free_port()
        assert FREE_PORT_MIN <= base and base + ROLE_PORTS <= _ephemeral_low()
        for port in range(base, base + ROLE_PORTS):
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))


def test_role_ports_and_overflow():
    assert role_ports(29500, agent_store=False) == {"policy": 29500, "reference": 29501, "bridge": 29502}
    assert role_ports(29500, agent_store=True) == {"policy": 29501, "reference": 29502, "bridge": 29503}
    with pytest.raises(TopologyError, match="use MASTER_PORT <= 65532"):
        role_ports(65533, agent_store=True)


@pytest.mark.parametrize("env,mode", [
    ({}, "local"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}, "local"),  # the batch shell: no step
    (SRUN_UNEVEN, "slurm"),
    ({**SLURM, "SLURM_STEPID": "3"}, "slurm"),
    (OMPI, "mpi"),
    ({**SRUN_UNEVEN, **OMPI}, "mpi"),  # mpirun inside an allocation
    (DEEPSPEED, "local"),  # a launcher we do not start ourselves runs launch.sh only in local mode
    ({**OMPI, "SPARSEPO_LAUNCH_MODE": "local"}, "local"),
])
def test_launch_mode(env, mode):
    assert launch_mode(env) == mode


def test_launch_mode_refuses_an_unknown_forced_mode():
    with pytest.raises(TopologyError, match="SPARSEPO_LAUNCH_MODE must be one of slurm, mpi, local, not 'pbs'"):
        launch_mode({"SPARSEPO_LAUNCH_MODE": "pbs"})


def test_shell_env_local_mode_and_tasks_on_node():
    assert shell_env({"MASTER_PORT": "29999"}) == ["sparsepo_mode=local", "sparsepo_master_addr=127.0.0.1",
                                                   "sparsepo_master_port=29999"]
    assert shell_env({"MASTER_ADDR": "head node", "MASTER_PORT": "1"})[1] == "sparsepo_master_addr='head node'"
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    with pytest.raises(TopologyError, match="lists 4 node"):
        tasks_on_node("2(x3),1", 4)


def test_print_env_is_shell_and_stays_light():
    """`python -m sparsepo.launch --print-env` under srun: export lines a shell can eval, no torch import."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **SRUN_UNEVEN}
    code = ("import runpy, sys; sys.argv = ['x', '--print-env']\n"
            "try: runpy.run_module('sparsepo.launch', run_name='__main__')\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    shown = subprocess.run(["bash", "-c", f'eval "$1"; echo "$sparsepo_mode $RANK/$WORLD_SIZE $LOCAL_SIZE '
                            f'$MASTER_ADDR:$MASTER_PORT"', "_", out], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["slurm", "6/7", "1", "node01:24242"]
    bad = subprocess.run([sys.executable, "-m", "sparsepo.launch", "--print-env"], capture_output=True, text=True,
                         env={**env, "SPARSEPO_LAUNCH_MODE": "pbs"})
    assert bad.returncode == 64 and "SPARSEPO_LAUNCH_MODE" in bad.stderr
