"""sparsepo.launch.process: each role's rewritten environment, the plan. Pure, no processes."""

import pytest

from launch_envs import DEEPSPEED, TORCHRUN, cfg, slurm_env
from sparsepo.launch.environ import LaunchEnv, global_launch_env, torch_dist_env
from sparsepo.launch.process import apply_role_env, bridge_address, plan, role_env, world_ports
from sparsepo.launch.topology import Topology, TopologyError

pytestmark = pytest.mark.unit


def test_cache_mode_role_env_is_the_launch_env():
    launch = LaunchEnv.from_environ(TORCHRUN)
    t = Topology.from_launch(cfg(), launch)
    assert role_env(t, 5, launch) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                     "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    out = apply_role_env(TORCHRUN, role_env(t, 5, launch), launch)
    assert {k: out[k] for k in TORCHRUN} == TORCHRUN  # nothing of the launch changed, agent store kept


def test_live_role_env_two_slurm_nodes():
    c = cfg(4, 2)  # policy 0..3 on node1, reference 4..7 on node2
    envs = {}
    for g in range(8):
        launch = LaunchEnv.from_environ(slurm_env(g))
        t = Topology.from_launch(c, launch)
        envs[g] = role_env(t, g, launch)
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
    assert bridge_address(t, launch) == ("node1", base + 2)
    assert len({base, base + 1, base + 2}) == 3


def test_reference_rank0_on_node0_uses_the_launch_master():
    launch = LaunchEnv.from_environ(slurm_env(3))
    t = Topology.from_launch(cfg(4, 2, "interleaved"), launch)  # reference 1,3,5,7 -> rank 0 at global 1
    assert role_env(t, 3, launch)["MASTER_ADDR"] == "node1"
    assert role_env(t, 1, launch)["RANK"] == "0"


def test_single_node_role_env_and_ports():
    launch = LaunchEnv.from_environ(DEEPSPEED)  # 4 ranks on one node, no agent store
    t = Topology.from_launch(cfg(2, 2), launch)
    pol, ref = role_env(t, 0, launch), role_env(t, 3, launch)
    assert pol == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert ref == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501"}
    assert bridge_address(t, launch) == ("127.0.0.1", 29502)
    assert world_ports(t, launch) == {"policy": 29500, "reference": 29501, "bridge": 29502}


def test_torchrun_live_mode_leaves_the_agent_port_alone():
    env = {**TORCHRUN, "GROUP_WORLD_SIZE": "1", "GROUP_RANK": "0", "WORLD_SIZE": "4", "RANK": "3",
           "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(2, 1), launch)
    ports = world_ports(t, launch)
    assert ports == {"policy": 29401, "reference": 29402, "bridge": 29403}  # the agent holds 29400
    for g in range(4):
        e = role_env(t, g, launch)
        assert e["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert int(e["MASTER_PORT"]) != launch.master_port
    assert bridge_address(t, launch)[1] == 29403


def test_multi_node_without_hosts_refuses_then_accepts_help():
    env = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(4, 2), launch)
    assert role_env(t, 0, launch)["MASTER_ADDR"] == "10.0.0.1"  # the policy never needs the host list
    with pytest.raises(TopologyError, match="cannot tell the host of reference rank 0 \\(global rank 4, node 1\\)"):
        role_env(t, 6, launch)
    assert role_env(t, 6, launch, master_addr="10.0.0.2")["MASTER_ADDR"] == "10.0.0.2"
    launch2 = LaunchEnv.from_environ({**env, "SPARSEPO_HOSTS": "10.0.0.1,10.0.0.2"})
    assert role_env(t, 6, launch2)["MASTER_ADDR"] == "10.0.0.2"


def test_uneven_slurm_nodes_find_the_reference_host():
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "2", "SLURM_NNODES": "3", "SLURM_TASKS_PER_NODE": "3,2(x2)",
           "SLURM_JOB_NODELIST": "gpu[01-03]"}
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(2, 2), launch)  # ranks_per_node unknown: uses tasks per node
    assert t.ranks_per_node is None and t.reference_ranks() == [5, 6]
    assert role_env(t, 6, launch)["MASTER_ADDR"] == "gpu03"


def test_role_env_refuses_a_different_world():
    t = Topology.build(cfg(2, 1), 8)
    with pytest.raises(TopologyError, match="built for world_size=8 but the launch has world_size=4"):
        role_env(t, 0, LaunchEnv.from_environ(DEEPSPEED))


def test_port_overflow_refused():
    launch = LaunchEnv.from_environ({**DEEPSPEED, "MASTER_PORT": "65534"})
    with pytest.raises(TopologyError, match="needs port 65536 > 65535"):
        role_env(Topology.from_launch(cfg(2, 1), launch), 0, launch)


def test_apply_role_env_keeps_globals_and_is_idempotent():
    env = slurm_env(6)
    launch = LaunchEnv.from_environ(env)
    t = Topology.from_launch(cfg(4, 2), launch)
    renv = role_env(t, 6, launch)
    out = apply_role_env(env, renv)
    assert env == slurm_env(6)  # input untouched
    assert out["RANK"] == "1" and out["WORLD_SIZE"] == "4" and out["PATH"] == "/usr/bin"
    assert out["SPARSEPO_GLOBAL_RANK"] == "6" and out["SPARSEPO_GLOBAL_WORLD_SIZE"] == "8"
    assert out["SPARSEPO_GLOBAL_MASTER_ADDR"] == "node1" and out["SPARSEPO_GLOBAL_MASTER_PORT"] == "23457"
    # a rewritten process recovers its global identity; applying again changes nothing
    assert global_launch_env(out) == launch
    assert apply_role_env(out, renv) == out
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



def test_torch_dist_env_of_a_rewritten_process_is_its_role_world():
    """What the engine reads after `os.environ.update(plan(...).env)`: the role's world, not the launch's."""
    for g in range(8):
        p = plan(cfg(4, 2), slurm_env(g), num_layers=4)
        got = torch_dist_env(p.env, lone_port=lambda: 1)
        assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
            {k: p.env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        assert got["MASTER_PORT"] == ("23457" if p.role.is_policy else "23458")
