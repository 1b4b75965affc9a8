"""The bridge: the only link between the policy group and the reference group, both ways.

A gloo process group over every process of the job, on its own TCPStore (global rank 0 hosts it),
separate from the roles' own DeepSpeed worlds. It carries:

* a typed **handshake** (`Handshake`, broadcast by the first policy rank before any scoring: where
  the run starts, how long it is, what the policy needs served, the config fingerprint) and a typed
  **finish** (`Finish`, broadcast by the first reference rank after its write-through);
* **messages** (`Message`) in either direction: `OUTPUTS` (reference -> policy, the reference
  outputs of one scheduled micro-batch) and `REQUEST` (policy -> reference: records to score on
  request, e.g. SPO's policy samples); for TR-DPO, `MANIFEST` (reference -> policy: the parameters a
  stage holds) and `WEIGHTS` (policy -> reference: one parameter of the moved reference, its name in
  place of the example ids). Every message carries its kind, its sequence number and its example ids;
  the receiver checks all three.

Window and back-pressure: an `Inbox` thread receives one peer's messages into a bounded queue (W);
when it is full it stops receiving, so the sender's `Outbox` (at most W sends in flight per
destination) stalls. The receiver names the peer and the last message on a timeout or a dead peer.

Nothing from the wire is unpickled: payloads are decoded with `torch.load(weights_only=True)`, which
accepts tensors, plain values and the two typed messages above only (a payload carrying any other
object, e.g. a pickled callable, is refused as a `BridgeError`). The store's server listens on the
job's own address (MASTER_ADDR), not on every interface.
"""

from __future__ import annotations

import datetime
import errno
import io
import logging
import pickle
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("sparsepo")
OUTPUTS, REQUEST, MANIFEST, WEIGHTS = 1, 2, 3, 4
KINDS = {OUTPUTS: "outputs", REQUEST: "request", MANIFEST: "manifest", WEIGHTS: "weights"}


class BridgeError(RuntimeError):
    """A message that is not the one the receiver expects (kind, sequence number or examples)."""


@dataclass(frozen=True, kw_only=True)
class Handshake:
    start_step: int
    total_steps: int
    outputs: tuple[str, ...]  # what the policy needs from the reference side
    config_fingerprint: str


@dataclass(frozen=True, kw_only=True)
class Finish:
    pairs_scored: int  # by the whole reference group in this run
    cache_indexed: bool  # the write-through cache now holds every pair


@dataclass(frozen=True, kw_only=True)
class Message:
    kind: int
    seq: int
    example_ids: list[str]
    records: list[dict] = field(default_factory=list)
    nbytes: int = 0  # set by `recv`: the bytes it took off the wire (header + payload)


def connect(addr: str, port: int, rank: int, world_size: int, timeout_s: float):
    """Join the bridge (global ranks); global rank 0 hosts its store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    listen_fd = listen_on(addr, port) if rank == 0 else None
    store = dist.TCPStore(addr, port, world_size, is_master=(rank == 0), timeout=timeout, use_libuv=False,
                          master_listen_fd=listen_fd)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def listen_on(addr: str, port: int) -> int | None:
    """A listening socket's fd on `addr` only, for a TCPStore server (which otherwise listens on every
    interface); None (every interface, with a warning) where `addr` is no address of this host."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        log.warning("store: %s is not an address of this host; listening on every interface", addr)
        return None
    return sock.detach()


def _encode(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _decode(payload: torch.Tensor, src: int | str = "?") -> Any:
    """Tensors, plain values, Handshake and Finish only; anything else is refused (no code runs)."""
    try:
        with torch.serialization.safe_globals([Handshake, Finish]):
            return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BridgeError(f"bridge message from rank {src} refused: not tensors and plain values "
                          f"(weights_only load: {first[:200]})") from None


def broadcast(bridge, obj: Any, *, src: int) -> Any:
    """Every bridge rank calls this; all return `src`'s object (the handshake and the finish)."""
    me = bridge.rank()
    payload = _encode(obj) if me == src else None
    size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.int64)
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    bridge.broadcast([size], opts).wait()
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    bridge.broadcast([payload], opts).wait()
    return obj if me == src else _decode(payload, src)


def send(bridge, dst: int, msg: Message) -> list:
    payload = _encode({"kind": msg.kind, "seq": msg.seq, "example_ids": msg.example_ids, "records": msg.records})
    header = torch.tensor([msg.kind, msg.seq, payload.numel()], dtype=torch.int64)
    return [bridge.send([header], dst, 0), bridge.send([payload], dst, 1)]


def recv(bridge, src: int) -> Message:
    header = torch.empty(3, dtype=torch.int64)
    bridge.recv([header], src, 0).wait()
    payload = torch.empty(int(header[2]), dtype=torch.uint8)
    bridge.recv([payload], src, 1).wait()
    body = _decode(payload, src)
    if (body["kind"], body["seq"]) != (int(header[0]), int(header[1])):
        raise BridgeError(f"bridge message from rank {src}: header says {KINDS.get(int(header[0]))} #{int(header[1])}, "
                          f"payload {KINDS.get(body['kind'])} #{body['seq']}")
    return Message(**body, nbytes=header.numel() * header.element_size() + payload.numel())


class Inbox:
    """Receives one peer's messages, in order, into a bounded queue (the window)."""

    def __init__(self, bridge, *, src: int, window: int):
        self.bridge, self.src = bridge, src
        self.queue: queue.Queue = queue.Queue(maxsize=window)
        self.thread = threading.Thread(target=self._receive, name=f"sparsepo-bridge-recv-{src}", daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while True:
            try:
                msg = recv(self.bridge, self.src)
            except Exception as e:  # noqa: BLE001 - handed to the reader; the thread ends
                self.queue.put(e)
                return
            self.queue.put(msg)

    def get(self, timeout_s: float) -> Message:
        """The next message; raises queue.Empty after `timeout_s`, or the transport's error."""
        item = self.queue.get(timeout=timeout_s)
        if isinstance(item, Exception):
            self.queue.put(item)  # every later get fails the same way
            raise item
        return item


class Outbox:
    """At most `window` sends in flight per destination; a full window blocks (back-pressure) until
    the peer's Inbox takes one. Numbers each destination's messages of each kind from 0."""

    def __init__(self, bridge, window: int):
        self.bridge, self.window = bridge, window
        self.inflight: dict[int, list[list]] = {}
        self.seq: dict[tuple[int, int], int] = {}

    def send(self, dst: int, kind: int, example_ids: list[str], records: list[dict]) -> int:
        pending = self.inflight.setdefault(dst, [])
        while len(pending) >= self.window:
            for work in pending.pop(0):
                work.wait()
        seq = self.seq.get((dst, kind), 0)
        pending.append(send(self.bridge, dst, Message(kind=kind, seq=seq, example_ids=list(example_ids),
                                                      records=records)))
        self.seq[(dst, kind)] = seq + 1
        return seq

    def flush(self) -> None:
        for pending in self.inflight.values():
            for works in pending:
                for work in works:
                    work.wait()
        self.inflight.clear()
