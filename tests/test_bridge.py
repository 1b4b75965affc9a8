"""The bridge protocol: two gloo ranks on threads over a real TCPStore.

Order is deterministic whatever the reference's timing; misaligned results are refused; a silent
reference produces the timeout error (naming the rank and the last batch served), not a hang.
Each scenario runs in a fresh interpreter that leaves through os._exit: a gloo thread still
blocked in recv at interpreter exit aborts the process (docs/field_notes.md, "Exit crash").
"""

import os
import random
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.distributed

from conftest import free_port
from sparsepo.reference.outputs import MisalignedOutputs
from sparsepo import bridge as br
from sparsepo.reference_role.sources import LiveSource, ReferenceTimeout


def bridges(timeout_s=20.0):
    port, out = free_port(), [None, None]

    def make(rank):
        out[rank] = br.connect("127.0.0.1", port, rank, 2, timeout_s)

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out  # [policy side (rank 0), reference side (rank 1)]


def fake_batch(i):
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.float)
    return SimpleNamespace(example_ids=[f"ex{i}"], response_mask=mask)


def record(i):
    return {"seq_logps": [torch.tensor(float(i)), torch.tensor(-float(i))],
            "token_logps": [torch.tensor([i, i + 0.5]), torch.tensor([-i])]}


def serve(bridge, n, *, window, delays=False, ids=None, stop_after=None):
    rng = random.Random(0)
    sender = br.Outbox(bridge, window)
    for i in range(n):
        if stop_after is not None and i == stop_after:
            sender.flush()
            return  # a reference that goes silent
        if delays:
            time.sleep(rng.uniform(0, 0.05))
        sender.send(0, br.OUTPUTS, [(ids or {}).get(i, f"ex{i}")], [record(i)])
    sender.flush()


def _order_is_deterministic_under_random_delays():
    policy, reference = bridges()
    t = threading.Thread(target=serve, args=(reference, 12), kwargs={"window": 3, "delays": True})
    t.start()
    live = LiveSource(policy, src=1, window=3, timeout_s=20)
    got = []
    for i in range(12):
        if i % 4 == 0:
            time.sleep(0.05)  # the policy is slower at times: back-pressure, not loss
        out = live.get(fake_batch(i))
        got.append(out.seq_logps.tolist())
        assert torch.equal(out.token_logps, torch.tensor([[0, i, i + 0.5], [0, -i, 0]], dtype=torch.float))
    t.join()
    assert got == [[float(i), -float(i)] for i in range(12)]


def _results_for_other_examples_are_refused():
    policy, reference = bridges()
    t = threading.Thread(target=serve, args=(reference, 2), kwargs={"window": 2, "ids": {1: "someone-else"}})
    t.start()
    live = LiveSource(policy, src=1, window=2, timeout_s=20)
    live.get(fake_batch(0))
    with pytest.raises(MisalignedOutputs, match="refusing to train on misaligned outputs"):
        live.get(fake_batch(1))
    t.join()


def _silent_reference_times_out_naming_rank_and_last_batch():
    policy, reference = bridges(timeout_s=30)
    t = threading.Thread(target=serve, args=(reference, 5), kwargs={"window": 2, "stop_after": 2})
    t.start()
    live = LiveSource(policy, src=1, window=2, timeout_s=1.5)
    live.get(fake_batch(0))
    live.get(fake_batch(1))
    t0 = time.perf_counter()
    with pytest.raises(ReferenceTimeout) as e:
        live.get(fake_batch(2))
    assert time.perf_counter() - t0 < 10
    assert "reference rank 1" in str(e.value) and "#1 (ex1...)" in str(e.value)
    t.join()


def _window_bounds_how_far_the_reference_runs_ahead():
    policy, reference = bridges()
    progress = []

    def counting_serve():
        sender = br.Outbox(reference, 2)
        for i in range(10):
            sender.send(0, br.OUTPUTS, [f"ex{i}"], [record(i)])
            progress.append(i)
        sender.flush()

    t = threading.Thread(target=counting_serve)
    t.start()
    live = LiveSource(policy, src=1, window=2, timeout_s=20)
    time.sleep(1.0)  # the policy consumes nothing yet
    ahead = len(progress)
    assert ahead <= 2 + 2 + 2, ahead  # receiver queue W + one in its hands + sender's W in flight
    for i in range(10):
        live.get(fake_batch(i))
    t.join()
    assert len(progress) == 10


def _messages_go_both_ways_with_a_typed_handshake_and_finish():
    policy, reference = bridges()
    seen = {}

    def reference_side():
        hs = br.broadcast(reference, None, src=0)
        seen["handshake"] = hs
        request = br.Inbox(reference, src=0, window=2).get(20)  # policy -> reference
        seen["request"] = request
        out = br.Outbox(reference, 2)
        out.send(0, br.OUTPUTS, request.example_ids, [record(hs.start_step)])
        out.flush()
        br.broadcast(reference, br.Finish(pairs_scored=1, cache_indexed=False), src=1)

    t = threading.Thread(target=reference_side)
    t.start()
    hs = br.Handshake(start_step=7, total_steps=9, outputs=("seq_logps",), config_fingerprint="abc")
    br.broadcast(policy, hs, src=0)
    sample = torch.tensor([3, 1, 4])
    requests = br.Outbox(policy, 2)
    requests.send(1, br.REQUEST, ["ex7"], [{"sample": sample}])
    requests.flush()
    live = LiveSource(policy, src=1, window=2, timeout_s=20)
    assert live.get(fake_batch(7)).seq_logps.tolist() == [7.0, -7.0]
    assert live.finish() == br.Finish(pairs_scored=1, cache_indexed=False)
    t.join()
    assert seen["handshake"] == hs
    assert seen["request"].kind == br.REQUEST and seen["request"].seq == 0
    assert torch.equal(seen["request"].records[0]["sample"], sample)


def _a_message_of_the_wrong_kind_is_refused():
    policy, reference = bridges()

    def reference_side():
        out = br.Outbox(reference, 2)
        out.send(0, br.REQUEST, ["ex0"], [record(0)])
        out.flush()

    t = threading.Thread(target=reference_side)
    t.start()
    live = LiveSource(policy, src=1, window=2, timeout_s=20)
    with pytest.raises(MisalignedOutputs, match="request #0"):
        live.get(fake_batch(0))
    t.join()


def run_isolated(name: str) -> None:
    code = (f"import os, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_bridge as m\n"
            f"try:\n    m.{name}()\nexcept BaseException:\n    import traceback; traceback.print_exc(); "
            f"sys.stdout.flush(); sys.stderr.flush(); os._exit(1)\nos._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario", ["_order_is_deterministic_under_random_delays",
                                      "_results_for_other_examples_are_refused",
                                      "_silent_reference_times_out_naming_rank_and_last_batch",
                                      "_window_bounds_how_far_the_reference_runs_ahead",
                                      "_messages_go_both_ways_with_a_typed_handshake_and_finish",
                                      "_a_message_of_the_wrong_kind_is_refused"])
def test_scenario(scenario):
    run_isolated(scenario)
