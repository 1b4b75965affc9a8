"""The live watchdog on a real TCPStore, three "processes" as watchdogs in one interpreter (fast):
a silent peer is lost after limit_s and named; a failed peer's blame is passed on; a preempted peer
makes the others leave with 3; a peer that is done is no longer watched."""

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from conftest import free_port
from sparsepo.liveness import DONE, FAILED, PREEMPTED, Watchdog, group_timeout_s

LIMIT, BEAT = 1.0, 0.1


@pytest.fixture
def trio():
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=10), wait_for_workers=False,
                           use_libuv=False)
    exits: dict[int, int] = {}
    done = threading.Event()

    def exit_fn(rank):
        def leave(code):
            exits[rank] = code
            if len(exits) >= 2:
                done.set()
        return leave

    dogs = [Watchdog.start("127.0.0.1", port, r, 3, limit_s=LIMIT, names=lambda r: f"peer {r}",
                           exit_fn=exit_fn(r), interval_s=BEAT) for r in range(3)]
    yield dogs, exits, done
    for d in dogs:
        d.stopping.set()
    for d in dogs:
        d.thread.join(5)
    time.sleep(2 * BEAT)  # helper threads of a last store call
    del master


def test_a_silent_peer_is_lost_and_named(trio, caplog):
    dogs, exits, done = trio
    t0 = time.monotonic()
    dogs[2].stopping.set()  # rank 2 stops beating (as under SIGSTOP) and posts nothing
    assert done.wait(LIMIT + 5), exits
    assert exits == {0: 1, 1: 1}
    assert LIMIT <= time.monotonic() - t0 <= LIMIT + 2
    assert "lost peer 2: no sign of life" in caplog.text


def test_a_failed_peer_is_named_with_its_blame(trio, caplog):
    dogs, exits, done = trio
    dogs[2].end(FAILED, "it broke", blame=None)
    assert done.wait(5), exits
    assert exits == {0: 1, 1: 1} and "peer 2 failed: it broke" in caplog.text


def test_a_preempted_peer_makes_the_others_leave_with_3(trio, caplog):
    dogs, exits, done = trio
    dogs[1].end(PREEMPTED, "preempted at step 4")
    assert done.wait(5), exits
    assert exits == {0: 3, 2: 3} and "peer 1 was preempted (preempted at step 4)" in caplog.text


@pytest.mark.integration  # waits out the liveness limit: out of the -m unit loop
def test_a_done_peer_is_not_lost(trio):
    dogs, exits, done = trio
    dogs[2].end(DONE)
    time.sleep(LIMIT + 1)
    assert exits == {}


def test_explain_names_a_peer_that_went_silent(trio):
    dogs, exits, _ = trio
    dogs[1].stopping.set()
    code, why, blame = dogs[0].explain(wait_s=5)
    assert (code, blame) == (1, 1) and "lost peer 1" in why


def test_group_timeout_backs_the_watchdog_up_below_torchs_default():
    assert 600 < group_timeout_s(600) < 1800 and group_timeout_s(10) > 10
