"""Topology: rank -> role maps, every refusal, launcher environments, role-world rewrites. Pure, no processes."""

import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest

from sparsepo.config import TopologyConfig
from sparsepo.topology import (
    DEFAULT_MASTER_PORT,
    LaunchEnv,
    Role,
    Topology,
    TopologyError,
    apply_role_env,
    expand_hostlist,
    global_launch_env,
    parse_tasks_per_node,
    plan,
)


def cfg(ref=0, stages=1, placement="last"):
    return TopologyConfig(reference_ranks=ref, pipeline_stages=stages, placement=placement)


# ------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------

# (world, reference_ranks, pipeline_stages, ranks_per_node, placement)
CASES = [
    (1, 0, 1, None, "last"),
    (4, 0, 1, 4, "last"),
    (4, 0, 4, None, "interleaved"),          # cache mode ignores the pipeline
    (2, 1, 1, None, "last"),
    (4, 2, 2, 4, "last"),
    (4, 2, 2, 2, "interleaved"),
    (5, 2, 2, None, "last"),
    (8, 2, 1, 8, "interleaved"),
    (8, 4, 2, 8, "interleaved"),
    (8, 6, 3, None, "last"),
    (9, 3, 3, 3, "last"),
    (10, 5, 5, None, "last"),
    (12, 3, 1, 4, "interleaved"),
    (12, 4, 2, None, "interleaved"),
    (16, 4, 2, 8, "last"),
    (16, 4, 2, 8, "interleaved"),
    (16, 8, 2, 8, "last"),
    (16, 8, 4, 4, "interleaved"),
    (24, 6, 3, None, "last"),
    (32, 2, 2, 8, "interleaved"),            # blocks of 16 = two nodes: every other node
    (32, 8, 2, 8, "interleaved"),
    (32, 8, 4, 8, "last"),
    (32, 16, 4, 8, "last"),
    (64, 16, 4, 8, "interleaved"),
    (64, 16, 8, 8, "last"),
    (64, 24, 3, 8, "last"),
]


@pytest.mark.parametrize("world,ref,stages,rpn,placement", CASES)
def test_layout_invariants(world, ref, stages, rpn, placement):
    t = Topology.build(cfg(ref, stages, placement), world, ranks_per_node=rpn)
    replicas = ref // stages if ref else 0
    n_policy = world - ref

    # counts
    assert (t.world_size, t.num_policy, t.num_reference, t.num_replicas) == (world, n_policy, ref, replicas)
    assert len(t.policy_ranks()) == n_policy and len(t.reference_ranks()) == ref
    assert t.live == (ref > 0)

    # every rank has exactly one role, and the lists partition the world
    assert sorted(t.policy_ranks() + t.reference_ranks()) == list(range(world))
    roles = [t.role_of(g) for g in range(world)]
    assert all(isinstance(r, Role) and r.global_rank == g for g, r in enumerate(roles))
    assert Counter(r.kind for r in roles) == Counter({"policy": n_policy, "reference": ref}) - Counter()
    assert t.role_of(0).is_policy  # global rank 0 (the launch's master) is always policy

    # role ranks are 0..n-1 inside each role, sizes agree
    pol = [r for r in roles if r.is_policy]
    assert sorted(r.role_rank for r in pol) == list(range(n_policy))
    assert all(r.role_world_size == n_policy == r.num_policy and r.index == r.role_rank for r in pol)
    assert t.policy_ranks() == sorted(t.policy_ranks())  # policy index follows global order
    refs = [r for r in roles if r.is_reference]
    assert sorted(r.role_rank for r in refs) == list(range(ref))
    for r in refs:
        assert r.role_world_size == ref and (r.num_stages, r.num_replicas) == (stages, replicas)
        # DeepSpeed PipeDataParallelTopology order: rank = stage * num_replicas + replica
        assert divmod(r.role_rank, replicas) == (r.stage, r.replica)
        assert r.index is None and r.num_policy is None

    if ref:
        # (replica, stage) order; stages in order within each replica, in rising global ranks
        ordered = [(t.role_of(g).replica, t.role_of(g).stage) for g in t.reference_ranks()]
        assert ordered == [(rep, s) for rep in range(replicas) for s in range(stages)]
        for rep in range(replicas):
            sr = t.stage_ranks(rep)
            assert [t.role_of(g).stage for g in sr] == list(range(stages))
            assert sr == sorted(sr)
            assert t.role_of(sr[0]).is_first_stage and t.role_of(sr[-1]).is_last_stage
        assert sum((t.stage_ranks(rep) for rep in range(replicas)), []) == t.reference_ranks()

        # reference_for_policy: deterministic round-robin, balanced, inverse of policies_for_replica
        served = Counter(t.reference_for_policy(i) for i in range(n_policy))
        assert set(served) <= set(range(replicas))
        assert max(served.values()) - min(served.get(rep, 0) for rep in range(replicas)) <= 1
        for rep in range(replicas):
            assert all(t.reference_for_policy(i) == rep for i in t.policies_for_replica(rep))
        assert sorted(sum((t.policies_for_replica(rep) for rep in range(replicas)), [])) == list(range(n_policy))
        assert [t.reference_for_policy(i) for i in range(n_policy)] == \
            [Topology.build(cfg(ref, stages, placement), world, ranks_per_node=rpn).reference_for_policy(i)
             for i in range(n_policy)]

    # the log table names every rank once
    table = t.describe().splitlines()
    assert len(table) == world + 2
    assert [line.split()[0] for line in table[2:]] == [str(g) for g in range(world)]


@pytest.mark.parametrize("world,ref,stages,rpn", [(16, 8, 2, 8), (32, 8, 4, 8), (32, 16, 4, 8), (64, 24, 3, 8),
                                                  (64, 16, 8, 8), (8, 4, 2, 4)])
def test_last_puts_reference_on_last_nodes(world, ref, stages, rpn):
    t = Topology.build(cfg(ref, stages, "last"), world, ranks_per_node=rpn)
    nodes = world // rpn
    ref_nodes = {t.node_of(g) for g in t.reference_ranks()}
    assert ref_nodes == set(range(nodes - ref // rpn, nodes))
    for node in ref_nodes:  # those nodes hold reference ranks only
        assert all(t.role_of(g).is_reference for g in range(node * rpn, (node + 1) * rpn))
    assert t.reference_ranks() == list(range(world - ref, world))


def test_last_keeps_a_replica_on_one_node_when_it_fits():
    t = Topology.build(cfg(8, 4), 32, ranks_per_node=8)
    for rep in range(2):
        assert len({t.node_of(g) for g in t.stage_ranks(rep)}) == 1


@pytest.mark.parametrize("world,ref,stages,rpn", [(8, 2, 1, 8), (8, 4, 2, 8), (16, 4, 2, 8), (32, 8, 2, 8),
                                                  (64, 16, 4, 8), (12, 3, 1, 4), (16, 8, 4, 4), (12, 4, 2, None)])
def test_interleaved_spreads_evenly(world, ref, stages, rpn):
    t = Topology.build(cfg(ref, stages, "interleaved"), world, ranks_per_node=rpn)
    block = world // ref
    refs = t.reference_ranks()
    # one reference rank at the end of every block
    assert sorted(refs) == [(j + 1) * block - 1 for j in range(ref)]
    for j in range(ref):
        kinds = [t.role_of(g).kind for g in range(j * block, (j + 1) * block)]
        assert kinds.count("reference") == 1
    if rpn:
        per_node = Counter(t.node_of(g) for g in refs)
        assert set(per_node) == set(range(world // rpn)) and len(set(per_node.values())) == 1


def test_interleaved_every_other_node_when_blocks_span_nodes():
    t = Topology.build(cfg(2, 2, "interleaved"), 32, ranks_per_node=8)
    assert t.reference_ranks() == [15, 31]
    assert sorted(t.node_of(g) for g in t.reference_ranks()) == [1, 3]


def test_cache_mode_is_all_policy():
    t = Topology.build(cfg(0, 4), 8, ranks_per_node=4, num_layers=2)  # stages unused without a group
    assert t.policy_ranks() == list(range(8)) and t.reference_ranks() == []
    assert not t.live
    with pytest.raises(TopologyError, match="no reference group"):
        t.reference_for_policy(0)
    with pytest.raises(TopologyError, match="no reference group"):
        t.stage_ranks(0)


def test_duck_typed_configs():
    a = Topology.build(cfg(4, 2), 8)
    b = Topology.build(SimpleNamespace(reference_ranks=4, pipeline_stages=2, placement="last"), 8)
    c = Topology.build({"reference_ranks": 4, "pipeline_stages": 2}, 8)
    assert a == b == c


def test_query_bounds():
    t = Topology.build(cfg(4, 2), 8)
    for bad in (-1, 8, "3", True):
        with pytest.raises(TopologyError, match="outside 0..world_size-1 = 0..7"):
            t.role_of(bad)
    with pytest.raises(TopologyError, match="replica=2 is outside 0..num_replicas-1 = 0..1"):
        t.stage_ranks(2)
    with pytest.raises(TopologyError, match="policy_index=4 is outside 0..num_policy-1 = 0..3"):
        t.reference_for_policy(4)


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,world,extra,needle", [
    (dict(ref=6, stages=4), 16, {},
     "reference_ranks=6 is not a multiple of topology.pipeline_stages=4: 6 % 4 = 2"),
    (dict(ref=4, stages=2), 4, {},
     "reference_ranks=4 leaves no policy ranks in a world of 4: world_size - reference_ranks = 4 - 4 = 0"),
    (dict(ref=6, stages=1), 4, {},
     "world_size - reference_ranks = 4 - 6 = -2"),
    (dict(ref=8, stages=8), 16, {"num_layers": 4},
     "pipeline_stages=8 > num_layers=4: each pipeline stage needs at least one layer, so at most 4 stages"),
    (dict(ref=-1), 4, {}, "topology.reference_ranks=-1 must be at least 0"),
    (dict(ref=2, stages=0), 4, {}, "topology.pipeline_stages=0 must be at least 1"),
    (dict(ref=2, stages=-2), 4, {}, "topology.pipeline_stages=-2 must be at least 1"),
    (dict(ref=2), 0, {}, "world_size=0 must be at least 1"),
    (dict(ref=2), -3, {}, "world_size=-3 must be at least 1"),
    (dict(ref=2), 8, {"ranks_per_node": 0}, "ranks_per_node=0 must be at least 1"),
    (dict(ref=2), 8, {"num_layers": 0}, "num_layers=0 must be at least 1"),
    (dict(ref=2), 10, {"ranks_per_node": 4},
     "world_size=10 is not a multiple of ranks_per_node=4: 10 % 4 = 2"),
    (dict(ref=2, placement="first"), 8, {},
     "topology.placement='first' is not a placement; valid values: 'last', 'interleaved'"),
    (dict(ref=4, stages=2, placement="interleaved"), 10, {},
     "world_size=10 is not a multiple of reference_ranks=4: 10 % 4 = 2, so the blocks cannot be equal"),
    (dict(ref=4, stages=2, placement="interleaved"), 24, {"ranks_per_node": 8},
     "blocks of world_size / reference_ranks = 24 / 4 = 6 ranks do not line up with nodes of 8 ranks "
     "(6 % 8 = 6 and 8 % 6 = 2), so nodes would hold unequal numbers of reference ranks "
     "(node 0: 1, node 1: 1, node 2: 2)"),
])
def test_refusals_carry_the_arithmetic(kwargs, world, extra, needle):
    with pytest.raises(TopologyError) as err:
        Topology.build(cfg(**kwargs), world, **extra)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("field,value", [("reference_ranks", 2.0), ("reference_ranks", "2"),
                                         ("pipeline_stages", True), ("pipeline_stages", None)])
def test_refuses_non_integers(field, value):
    c = {"reference_ranks": 2, "pipeline_stages": 1, field: value}
    with pytest.raises(TopologyError, match=f"topology.{field}=.* must be an integer"):
        Topology.build(c, 8)


def test_refusal_suggests_fixes():
    with pytest.raises(TopologyError) as err:
        Topology.build(cfg(4, 2, "interleaved"), 10)
    assert "Use reference_ranks in [1, 2, 5]" in str(err.value) and "placement='last'" in str(err.value)
    with pytest.raises(TopologyError, match=r"use reference_ranks = 4 x replicas, e.g. 4"):
        Topology.build(cfg(6, 4), 16)


def test_pipeline_equal_to_layers_is_fine():
    t = Topology.build(cfg(4, 4), 8, num_layers=4)
    assert t.stage_ranks(0) == [4, 5, 6, 7]


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

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "5", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
            "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": "0"}
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
             "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "4"}
SLURM = {"SLURM_JOB_ID": "123457", "SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
         "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "node[1-2]", "SLURMD_NODENAME": "node2"}
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


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


# ------------------------------------------------------------------------------------------
# Role environments
# ------------------------------------------------------------------------------------------

def slurm_env(rank, world=8, per_node=4, job=123457, nodelist="node[1-2]"):
    return {"SLURM_JOB_ID": str(job), "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
            "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
            "SLURM_NNODES": str(world // per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{world // per_node})",
            "SLURM_JOB_NODELIST": nodelist, "PATH": "/usr/bin"}


def test_cache_mode_role_env_is_the_launch_env():
    launch = LaunchEnv.from_environ(TORCHRUN)
    t = Topology.from_launch(cfg(), launch)
    assert t.role_env(5, launch) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                     "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    out = apply_role_env(TORCHRUN, t.role_env(5, launch), launch)
    assert {k: out[k] for k in TORCHRUN} == TORCHRUN  # nothing of the launch changed, agent store kept


def test_live_role_env_two_slurm_nodes():
    c = cfg(4, 2)  # policy 0..3 on node1, reference 4..7 on node2
    envs = {}
    for g in range(8):
        launch = LaunchEnv.from_environ(slurm_env(g))
        t = Topology.from_launch(c, launch)
        envs[g] = t.role_env(g, launch)
        assert envs[g]["LOCAL_RANK"] == str(g % 4)  # physical device index kept
        assert envs[g]["LOCAL_WORLD_SIZE"] == "4"
    base = 23457
    for g in range(4):
        assert envs[g]["WORLD_SIZE"] == "4" and envs[g]["RANK"] == str(g)
        assert (envs[g]["MASTER_ADDR"], envs[g]["MASTER_PORT"]) == ("node1", str(base))
    for g in range(4, 8):
        assert envs[g]["WORLD_SIZE"] == "4"
        assert (envs[g]["MASTER_ADDR"], envs[g]["MASTER_PORT"]) == ("node2", str(base + 1))
    assert sorted(int(envs[g]["RANK"]) for g in range(4, 8)) == [0, 1, 2, 3]
    # stage-major role ranks: global 4,5 = replica 0 stages 0,1; global 6,7 = replica 1 stages 0,1
    assert [envs[g]["RANK"] for g in range(4, 8)] == ["0", "2", "1", "3"]
    assert t.bridge_address(launch) == ("node1", base + 2)
    assert len({base, base + 1, base + 2}) == 3


def test_reference_rank0_on_node0_uses_the_launch_master():
    launch = LaunchEnv.from_environ(slurm_env(3))
    t = Topology.from_launch(cfg(4, 2, "interleaved"), launch)  # reference 1,3,5,7 -> rank 0 at global 1
    assert t.role_env(3, launch)["MASTER_ADDR"] == "node1"
    assert t.role_env(1, launch)["RANK"] == "0"


def test_single_node_role_env_and_ports():
    launch = LaunchEnv.from_environ(DEEPSPEED)  # 4 ranks on one node, no agent store
    t = Topology.from_launch(cfg(2, 2), launch)
    pol, ref = t.role_env(0, launch), t.role_env(3, launch)
    assert pol == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert ref == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501"}
    assert t.bridge_address(launch) == ("127.0.0.1", 29502)
    assert t.ports(launch) == {"policy": 29500, "reference": 29501, "bridge": 29502}


def test_torchrun_live_mode_leaves_the_agent_port_alone():
    env = {**TORCHRUN, "GROUP_WORLD_SIZE": "1", "GROUP_RANK": "0", "WORLD_SIZE": "4", "RANK": "3",
           "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(2, 1), launch)
    ports = t.ports(launch)
    assert ports == {"policy": 29401, "reference": 29402, "bridge": 29403}  # the agent holds 29400
    for g in range(4):
        e = t.role_env(g, launch)
        assert e["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert int(e["MASTER_PORT"]) != launch.master_port
    assert t.bridge_address(launch)[1] == 29403


def test_multi_node_without_hosts_refuses_then_accepts_help():
    env = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(4, 2), launch)
    assert t.role_env(0, launch)["MASTER_ADDR"] == "10.0.0.1"  # the policy never needs the host list
    with pytest.raises(TopologyError, match="cannot tell the host of reference rank 0 \\(global rank 4, node 1\\)"):
        t.role_env(6, launch)
    assert t.role_env(6, launch, master_addr="10.0.0.2")["MASTER_ADDR"] == "10.0.0.2"
    launch2 = LaunchEnv.from_environ({**env, "SPARSEPO_HOSTS": "10.0.0.1,10.0.0.2"})
    assert t.role_env(6, launch2)["MASTER_ADDR"] == "10.0.0.2"


def test_uneven_slurm_nodes_find_the_reference_host():
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "2", "SLURM_NNODES": "3", "SLURM_TASKS_PER_NODE": "3,2(x2)",
           "SLURM_JOB_NODELIST": "gpu[01-03]"}
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(2, 2), launch)  # ranks_per_node unknown: uses tasks per node
    assert t.ranks_per_node is None and t.reference_ranks() == [5, 6]
    assert t.role_env(6, launch)["MASTER_ADDR"] == "gpu03"


def test_role_env_refuses_a_different_world():
    t = Topology.build(cfg(2, 1), 8)
    with pytest.raises(TopologyError, match="built for world_size=8 but the launch has world_size=4"):
        t.role_env(0, LaunchEnv.from_environ(DEEPSPEED))


def test_port_overflow_refused():
    launch = LaunchEnv.from_environ({**DEEPSPEED, "MASTER_PORT": "65534"})
    with pytest.raises(TopologyError, match="needs port 65536 > 65535"):
        Topology.from_launch(cfg(2, 1), launch).role_env(0, launch)


def test_apply_role_env_keeps_globals_and_is_idempotent():
    env = slurm_env(6)
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(4, 2), launch)
    role_env = t.role_env(6, launch)
    out = apply_role_env(env, role_env)
    assert env == slurm_env(6)  # input untouched
    assert out["RANK"] == "1" and out["WORLD_SIZE"] == "4" and out["PATH"] == "/usr/bin"
    assert out["SPARSEPO_GLOBAL_RANK"] == "6" and out["SPARSEPO_GLOBAL_WORLD_SIZE"] == "8"
    assert out["SPARSEPO_GLOBAL_MASTER_ADDR"] == "node1" and out["SPARSEPO_GLOBAL_MASTER_PORT"] == "23457"
    # a rewritten process recovers its global identity; applying again changes nothing
    assert global_launch_env(out) == launch
    assert apply_role_env(out, role_env) == out
    # and a plain reader of the rewritten env sees the role world (what DeepSpeed sees)
    seen = LaunchEnv.from_environ(out)
    assert (seen.rank, seen.world_size) == (1, 4)


def test_process_env_and_plan_for_every_rank():
    c = cfg(4, 2)
    worlds: dict[str, list[dict]] = {"policy": [], "reference": []}
    bridges = set()
    for g in range(8):
        p = plan(c, slurm_env(g), num_layers=4)
        assert p.launch.rank == g and p.role == p.topology.role_of(g)
        assert p.env["SPARSEPO_ROLE"] == p.role.kind and p.env["SPARSEPO_GLOBAL_RANK"] == str(g)
        if p.role.is_reference:
            assert (p.env["SPARSEPO_STAGE"], p.env["SPARSEPO_REPLICA"]) == (str(p.role.stage), str(p.role.replica))
        else:
            assert "SPARSEPO_STAGE" not in p.env
        bridges.add((p.bridge, p.env["SPARSEPO_BRIDGE_ADDR"], p.env["SPARSEPO_BRIDGE_PORT"]))
        worlds[p.role.kind].append(p.env)
        # planning again from the rewritten env gives the same answer
        assert plan(c, p.env, num_layers=4).env == p.env
    assert bridges == {(("node1", 23459), "node1", "23459")}
    for kind, envs in worlds.items():
        assert sorted(int(e["RANK"]) for e in envs) == list(range(len(envs)))
        assert {e["WORLD_SIZE"] for e in envs} == {str(len(envs))}
        assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert worlds["policy"][0]["MASTER_PORT"] != worlds["reference"][0]["MASTER_PORT"]


def test_plan_refuses_before_anything_starts():
    with pytest.raises(TopologyError, match="6 % 4 = 2"):
        plan(cfg(6, 4), slurm_env(0))


def test_describe_names_roles():
    t = Topology.build(cfg(4, 2), 16, ranks_per_node=8)
    text = t.describe()
    assert "world_size=16 = 12 policy + 4 reference (2 replica(s) x 2 stage(s)), placement=last" in text
    assert "serves policy 0,2,4,6,8,10" in text and "last stage" in text
    assert "cache mode" in Topology.build(cfg(), 2).describe()


def test_module_is_pure():
    code = "import sys, sparsepo.topology; assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
