"""sparsepo.launch.topology: rank -> role maps and every refusal. Pure, no processes."""

from collections import Counter
from types import SimpleNamespace

import pytest

from launch_envs import cfg
from sparsepo.launch.topology import Role, Topology, TopologyError

pytestmark = pytest.mark.unit


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


def test_describe_names_roles():
    t = Topology.build(cfg(4, 2), 16, ranks_per_node=8)
    text = t.describe()
    assert "world_size=16 = 12 policy + 4 reference (2 replica(s) x 2 stage(s)), placement=last" in text
    assert "serves policy 0,2,4,6,8,10" in text and "last stage" in text
    assert "cache mode" in Topology.build(cfg(), 2).describe()

