"""The schedule both roles walk: pure, so checked here without processes.

The trainer walks `Schedule.steps(start, total, rank)`; the reference server walks
`server.rounds(...)`. Recording both walks for several world sizes, replica counts, resume points
and epochs, every policy rank must receive exactly its own walk, in its order.
"""

from types import SimpleNamespace

import pytest

from sparsepo.config import TopologyConfig
from sparsepo.reference_role.server import rounds
from sparsepo.schedule import Schedule
from sparsepo.launch.topology import Topology

pytestmark = pytest.mark.unit


def schedule(num_rows=40, dp=2, micro=2, accum=2, seed=3):
    cfg = SimpleNamespace(train=SimpleNamespace(micro_batch_size=micro, grad_accum=accum, seed=seed))
    return Schedule.from_config(cfg, num_rows=num_rows, dp=dp)


def test_each_step_consumes_one_global_batch_without_repeats_and_epochs_reshuffle():
    s = schedule()
    per_epoch = s.steps_per_epoch
    assert per_epoch == 40 // 8
    for step in range(2 * per_epoch):
        rows = [r for p in range(2) for _, slots in s.steps(step, step + 1, p) for slot in slots for r in slot.rows]
        assert len(rows) == len(set(rows)) == 8
    epoch = [r for step in range(per_epoch) for p in range(2) for _, slots in s.steps(step, step + 1, p)
             for slot in slots for r in slot.rows]
    assert sorted(epoch) == list(range(40))  # one epoch covers every row once
    first = [slot.rows for _, slots in s.steps(0, 1, 0) for slot in slots]
    second = [slot.rows for _, slots in s.steps(per_epoch, per_epoch + 1, 0) for slot in slots]
    assert first != second


def test_trainer_walk_is_grouped_by_step_in_micro_order():
    s = schedule(accum=3)
    walk = list(s.steps(2, 5, 1))
    assert [step for step, _ in walk] == [2, 3, 4]
    assert all([slot.micro for slot in slots] == [0, 1, 2] and {slot.policy_rank for slot in slots} == {1}
               for _, slots in walk)


@pytest.mark.parametrize("world,ref,stages", [(3, 1, 1), (4, 2, 2), (6, 2, 1), (8, 4, 2), (10, 5, 1), (12, 4, 2)])
@pytest.mark.parametrize("start,total", [(0, 7), (3, 12)])  # several epochs, and a resumed run
def test_server_walk_delivers_each_policy_rank_exactly_the_trainers_walk(world, ref, stages, start, total):
    topo = Topology.build(TopologyConfig(reference_ranks=ref, pipeline_stages=stages, placement="last"), world)
    dp = topo.num_policy
    s = schedule(num_rows=50, dp=dp, micro=2, accum=2)
    received: dict[int, list] = {p: [] for p in range(dp)}
    for round_slots in rounds(s, topo, start, total):
        assert len(round_slots) == topo.num_replicas
        for replica, slot in enumerate(round_slots):
            assert topo.reference_for_policy(slot.policy_rank) == replica  # served by its own replica
            received[slot.policy_rank].append(slot)
    for p in range(dp):
        trainer = [slot for _, slots in s.steps(start, total, p) for slot in slots]
        assert received[p] == trainer, p


def test_unequal_replicas_are_refused():
    with pytest.raises(ValueError, match="unequal"):
        list(schedule().rounds(0, 1, [[0, 2], [1]]))


def test_too_few_rows_for_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        schedule(num_rows=5).rows_for(0, 0, 0)
