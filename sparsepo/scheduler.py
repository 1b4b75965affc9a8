"""The scheduler: the only link between the policy group and the reference group.

Both sides compute the same schedule, a pure function of (config, dataset size, step): which rows
policy rank p consumes at (step, micro-step). The reference group therefore needs no requests: each
replica walks the schedule of the policy ranks it serves, scores ahead, and sends each result to
its consumer over the **bridge** (a gloo group spanning every process, separate from the roles'
own DeepSpeed worlds). Order never depends on timing: every message carries its sequence number
and example ids, both checked on arrival.

Window and back-pressure: the policy's receiver thread holds at most W results (a bounded queue);
when it is full it stops receiving, so the reference's sends (at most W in flight) stall and the
group stops scoring ahead. Waiting time of the policy is measured per step (`ref_wait`).
Failure: a silent or dead reference rank makes the policy fail within reference.timeout_s, with a
message naming the rank and the last batch it served; it never trains on missing outputs.
"""

from __future__ import annotations

import datetime
import io
import logging
import queue
import threading

import torch
import torch.distributed as dist

from sparsepo.data import epoch_order, micro_batch_indices, steps_per_epoch
from sparsepo.reference.outputs import MisalignedOutputs, ReferenceOutputs

log = logging.getLogger("sparsepo")


class ReferenceTimeout(RuntimeError):
    """The reference group sent nothing within reference.timeout_s."""


def rows_for(cfg, num_rows: int, dp: int, step: int, micro: int, policy_index: int) -> list[int]:
    """The dataset rows policy rank `policy_index` consumes at (step, micro). The trainer and the
    reference group both call this; it is the whole contract between them."""
    t = cfg.train
    per_epoch = steps_per_epoch(num_rows, t.micro_batch_size * t.grad_accum * dp)
    epoch, in_epoch = divmod(step, per_epoch)
    return micro_batch_indices(epoch_order(num_rows, t.seed, epoch), step=in_epoch,
                               micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, dp_size=dp,
                               dp_rank=policy_index, micro_step=micro)


# --- the bridge: serialised records over a gloo group -----------------------------------------

def connect_bridge(addr: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group over every process of the job, on its own TCPStore (global rank 0 hosts it)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(addr, port, world_size, is_master=(rank == 0), timeout=timeout, use_libuv=False)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def _pack(seq: int, example_ids: list[str], records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    buf = io.BytesIO()
    torch.save({"seq": seq, "example_ids": example_ids, "records": records}, buf)
    payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    return torch.tensor([seq, payload.numel()], dtype=torch.int64), payload


def send(bridge, dst: int, seq: int, example_ids: list[str], records: list[dict]) -> list:
    header, payload = _pack(seq, example_ids, records)
    return [bridge.send([header], dst, 0), bridge.send([payload], dst, 1)]


def recv(bridge, src: int) -> dict:
    header = torch.empty(2, dtype=torch.int64)
    bridge.recv([header], src, 0).wait()
    payload = torch.empty(int(header[1]), dtype=torch.uint8)
    bridge.recv([payload], src, 1).wait()
    msg = torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)
    if msg["seq"] != int(header[0]):
        raise MisalignedOutputs(f"bridge message header says batch {int(header[0])}, payload {msg['seq']}")
    return msg


def broadcast_int(bridge, value: int, src: int = 0) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    bridge.broadcast([t], opts).wait()
    return int(t.item())


# --- policy side ----------------------------------------------------------------------------

class LiveReference:
    """Policy-side end of the scheduler: a thread receives this rank's results in order into a
    bounded queue (the window); `get` hands over the next one after checking it belongs to the batch."""

    def __init__(self, bridge, *, src: int, window: int, timeout_s: float, first_seq: int = 0):
        self.bridge, self.src, self.timeout_s = bridge, src, timeout_s
        self.queue: queue.Queue = queue.Queue(maxsize=window)
        self.next_seq = first_seq
        self.last_served: str = "none yet"
        self.thread = threading.Thread(target=self._receive, name="sparsepo-bridge-recv", daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while True:
            try:
                msg = recv(self.bridge, self.src)
            except Exception as e:  # surfaces in get(); the thread ends
                self.queue.put(e)
                return
            self.queue.put(msg)

    def get(self, batch, device="cpu") -> ReferenceOutputs:
        try:
            msg = self.queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise ReferenceTimeout(
                f"no reference outputs from reference rank {self.src} (global) for {self.timeout_s:.0f}s "
                f"waiting for batch {self.next_seq}; last batch served: {self.last_served}. The reference "
                f"group is dead, hung or far slower than the policy (reference.timeout_s)") from None
        if isinstance(msg, Exception):
            raise ReferenceTimeout(f"bridge to reference rank {self.src} failed waiting for batch "
                                   f"{self.next_seq} (last served: {self.last_served}): {msg}") from msg
        if msg["seq"] != self.next_seq or msg["example_ids"] != list(batch.example_ids):
            raise MisalignedOutputs(
                f"reference rank {self.src} sent batch {msg['seq']} for examples {msg['example_ids'][:3]}... "
                f"but the policy expects batch {self.next_seq} for {list(batch.example_ids)[:3]}...: refusing "
                f"to train on misaligned outputs (the two sides disagree on the schedule or the data)")
        self.last_served = f"#{self.next_seq} ({msg['example_ids'][0]}...)"
        self.next_seq += 1
        return ReferenceOutputs.from_records(batch.example_ids, msg["records"], batch.response_mask, device)


# --- reference side ---------------------------------------------------------------------------

class Sender:
    """Reference-side end: at most `window` sends in flight per destination; a full window blocks
    (back-pressure) until the policy's receiver takes one."""

    def __init__(self, bridge, window: int):
        self.bridge, self.window = bridge, window
        self.inflight: dict[int, list[list]] = {}
        self.seq: dict[int, int] = {}

    def send(self, dst: int, example_ids: list[str], records: list[dict]) -> None:
        pending = self.inflight.setdefault(dst, [])
        while len(pending) >= self.window:
            for work in pending.pop(0):
                work.wait()
        seq = self.seq.get(dst, 0)
        pending.append(send(self.bridge, dst, seq, example_ids, records))
        self.seq[dst] = seq + 1

    def flush(self) -> None:
        for pending in self.inflight.values():
            for works in pending:
                for work in works:
                    work.wait()
        self.inflight.clear()

