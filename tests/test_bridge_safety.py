"""Issue 25: nothing from the wire is unpickled (bridge payloads load with weights_only=True), and the
bridge's store listens on the job's own address only."""

import io
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import free_port
from sparsepo import bridge as br


def _touch(path):  # what a crafted payload would run on the receiver
    open(path, "w").close()
    return "ran"


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def crafted(path) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save({"kind": br.OUTPUTS, "seq": 0, "example_ids": ["ex0"], "records": [{"x": Payload(path)}]}, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(br.BridgeError, match="from rank 3 refused: not tensors and plain values"):
        br._decode(crafted(str(marker)), 3)
    assert not marker.exists()


def test_typed_messages_tensors_and_plain_values_still_decode():
    hs = br.Handshake(start_step=2, total_steps=9, outputs=("seq_logps", "topk"), config_fingerprint="ab12")
    done = br.Finish(pairs_scored=5, cache_indexed=True)
    body = {"kind": br.REQUEST, "seq": 4, "example_ids": ["a", "b"],
            "records": [{"ids": torch.arange(3), "text": "x", "n": 1, "p": 0.5, "v": [torch.ones(2), None]}]}
    assert br._decode(br._encode(hs)) == hs and br._decode(br._encode(done)) == done
    got = br._decode(br._encode(body))
    assert got["example_ids"] == ["a", "b"] and torch.equal(got["records"][0]["ids"], torch.arange(3))
    assert got["records"][0]["v"][1] is None and got["records"][0]["p"] == 0.5


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* lists them) with a socket listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                out.add(addr)
    return out


def _pair(port):
    out = [None, None]

    def make(rank):
        out[rank] = br.connect("127.0.0.1", port, rank, 2, 20.0)

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def _store_listens_on_loopback_only_and_a_crafted_message_is_refused():
    port = free_port()
    policy, reference = _pair(port)
    assert _listening_addresses(port) == {"0100007F"}, _listening_addresses(port)  # 127.0.0.1, not 0.0.0.0 / ::
    marker = os.path.join(os.environ["SAFETY_TMP"], "pwned")
    payload = crafted(marker)  # sent as a real peer would: header, then payload
    header = torch.tensor([br.OUTPUTS, 0, payload.numel()], dtype=torch.int64)
    sender = threading.Thread(target=lambda: [w.wait() for w in (reference.send([header], 0, 0),
                                                                  reference.send([payload], 0, 1))])
    sender.start()
    try:
        br.recv(policy, 1)
    except br.BridgeError as e:
        assert "from rank 1 refused" in str(e), e
    else:
        raise AssertionError("a crafted message was accepted")
    sender.join()
    assert not os.path.exists(marker)


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_over_a_real_bridge(tmp_path):
    # a process of its own: gloo's threads may abort an interpreter at exit (FIELD_NOTES), so it leaves by os._exit
    code = (f"import os, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_bridge_safety as m\n"
            f"try:\n    m._store_listens_on_loopback_only_and_a_crafted_message_is_refused()\nexcept BaseException:\n"
            f"    import traceback; traceback.print_exc(); sys.stdout.flush(); sys.stderr.flush(); os._exit(1)\n"
            f"os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SAFETY_TMP": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_address_of_another_host_falls_back_to_every_interface():
    assert br.listen_on("192.0.2.1", free_port()) is None  # TEST-NET-1: never an address of this host
