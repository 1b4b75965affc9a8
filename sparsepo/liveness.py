"""Liveness: no rank waits on a stalled or dead peer for more than a limit, and every rank says which
peer it lost. In live mode the limit is reference.timeout_s and the watchdog runs on the bridge's store;
a cache / inline run on several ranks watches its policy ranks alike, on its process group's own store,
with train.peer_timeout_s (sparsepo.trainer.watch_peers).

Why: the two roles run in separate worlds joined by the bridge, so a stalled peer (SIGSTOP, a hung
collective, a dead node) leaves the other role's healthy ranks blocked in their own collectives,
where no timeout names anyone. Each process of a live job runs a `Watchdog` thread on the bridge's
store (global rank 0 hosts it):

* it beats a counter `hb/<rank>` every `interval_s`, and notes when each peer's counter last moved;
* a peer silent for `limit_s` (= reference.timeout_s) is lost: this process logs "lost <peer>" and
  leaves with exit 1, whatever its main thread is blocked in;
* a process ending posts `status/<rank>` (`end`): done, preempted or failed (with the peer it blames,
  if any). A peer's failure makes every other process leave with 1 naming it; a preemption makes
  every process leave with 3 (EXIT_PREEMPTED), so a preempted job exits 3 whichever process the
  launcher polls; done peers are no longer watched.

The store host lingers at its end (at most `limit_s`) until every peer has posted its end or gone
silent, so no peer loses the store before it has read why.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("sparsepo")

DONE, PREEMPTED, FAILED = "done", "preempted", "failed"
_active: "Watchdog | None" = None


def group_timeout_s(timeout_s: float) -> float:
    """Each role's own process-group timeout in live mode: a backstop behind the watchdog (which
    acts at timeout_s), far below torch's default 1800 s, with room for slow start-up collectives."""
    return 2 * timeout_s + 60


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, *, limit_s: float, names: Callable[[int], str],
                 exit_fn: Callable[[int], None], interval_s: float = 1.0, hosts_store: bool = False,
                 limit_name: str = "reference.timeout_s"):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.limit_name = limit_name  # the config key of limit_s, for the messages
        self.limit_s, self.interval_s, self.names, self.exit_fn = limit_s, interval_s, names, exit_fn
        self.hosts_store = hosts_store
        self.store_lost: str | None = None  # why, once any store call failed: no further calls then
        self.peers = [r for r in range(world_size) if r != rank]
        self.seen = {r: (-1, time.monotonic()) for r in self.peers}  # last counter value, when it moved
        self.ended: dict[int, dict] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sparsepo-watchdog", daemon=True)

    @classmethod
    def start(cls, addr: str, port: int, rank: int, world_size: int, *, limit_s: float, names, exit_fn,
              interval_s: float = 1.0, limit_name: str = "reference.timeout_s") -> "Watchdog":
        """Connect a store client of its own to the store at addr:port (the bridge's in live mode, after
        bridge.connect; the process group's own otherwise, after it started)."""
        import torch.distributed as dist

        store = dist.TCPStore(addr, port, None, False, datetime.timedelta(seconds=limit_s),
                              wait_for_workers=False, use_libuv=False)
        store.add(f"hb/{rank}", 1)
        global _active
        _active = cls(store, rank, world_size, limit_s=limit_s, names=names, exit_fn=exit_fn,
                      interval_s=interval_s, hosts_store=rank == 0, limit_name=limit_name)
        _active.thread.start()
        return _active

    def _bounded(self, fn, *args):
        """`fn(*args)` on a helper thread, given at most limit_s: a TCPStore client blocks without
        end on a stopped (SIGSTOP) store host, whatever its timeout."""
        box: dict = {}

        def call():
            try:
                box["ok"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box["error"] = e

        t = threading.Thread(target=call, name="sparsepo-watchdog-store", daemon=True)
        t.start()
        t.join(self.limit_s)
        if t.is_alive():
            raise TimeoutError(f"the bridge store did not answer for {self.limit_s:g}s")
        if "error" in box:
            raise box["error"]
        return box.get("ok")

    # -- the thread ----------------------------------------------------------------------------
    def silent_for(self, r: int) -> float:
        with self.lock:
            return time.monotonic() - self.seen[r][1]

    def _poll(self) -> None:
        """One beat: bump our counter, read every peer's counter and any new ends."""
        self.store.add(f"hb/{self.rank}", 1)
        now = time.monotonic()
        counts = [self.store.add(f"hb/{r}", 0) for r in self.peers]
        with self.lock:
            for r, c in zip(self.peers, counts):
                if c != self.seen[r][0]:
                    self.seen[r] = (c, now)
        if self.store.add("ended", 0) > len(self.ended):
            for r in self.peers:
                if r not in self.ended and self.store.check([f"status/{r}"]):
                    self.ended[r] = json.loads(self.store.get(f"status/{r}"))

    def verdict(self, limit_s: float | None = None) -> tuple[int, str, int | None] | None:
        """(exit code, why, the peer to blame) when this process must leave because of a peer, else None.
        A peer is lost when silent for `limit_s` (default: the watchdog's limit)."""
        for r, st in sorted(self.ended.items()):
            if st["state"] == PREEMPTED:
                return 3, f"{self.names(r)} was preempted ({st['message']}); leaving with it", None
            if st["state"] == FAILED:
                blame = st.get("blame")
                if blame is not None and blame != self.rank:
                    return 1, f"lost {self.names(blame)} (reported by {self.names(r)}: {st['message']})", blame
                return 1, f"{self.names(r)} failed: {st['message']}", r
        limit = self.limit_s if limit_s is None else limit_s
        silent = [r for r in self.peers if r not in self.ended and self.silent_for(r) > limit]
        if silent:
            return 1, self._lost(silent[0]), silent[0]
        return None

    def _store_lost(self, e: Exception) -> str:
        self.store_lost = self.store_lost or (f"lost {self.names(0)}, which hosts the store the job meets on "
                                              f"({type(e).__name__}: {str(e)[:200]}): stopped, hung or dead")
        return self.store_lost

    def _lost(self, r: int) -> str:
        return (f"lost {self.names(r)}: no sign of life for {self.silent_for(r):.0f}s (stopped, hung or dead; "
                f"limit {self.limit_name}={self.limit_s:g})")

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            store_lost = False
            try:
                self._bounded(self._poll)
                found = self.verdict()
            except Exception as e:  # noqa: BLE001 - the store itself is gone or stalled
                found, store_lost = (1, self._store_lost(e), 0), True
            if found is None or self.stopping.is_set():
                continue
            code, why, blame = found
            (log.warning if code == 3 else log.error)("watchdog: %s", why)
            try:
                if not store_lost:  # else there is no one to tell
                    self._bounded(self._post, PREEMPTED if code == 3 else FAILED, why, blame)
                    self._linger()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
            self.exit_fn(code)
            return

    # -- ending --------------------------------------------------------------------------------
    def _post(self, state: str, message: str, blame: int | None) -> None:
        self.store.set(f"status/{self.rank}", json.dumps({"state": state, "message": message, "blame": blame}))
        self.store.add("ended", 1)

    def _linger(self) -> None:
        """The store host waits (at most limit_s) until every peer has posted its end or gone silent."""
        if not self.hosts_store:
            return
        deadline = time.monotonic() + self.limit_s
        while time.monotonic() < deadline:
            self._bounded(self._poll)
            if all(r in self.ended or self.silent_for(r) > 3 * self.interval_s for r in self.peers):
                return
            time.sleep(self.interval_s / 4)

    def explain(self, wait_s: float = 10.0) -> tuple[int, str, int | None] | None:
        """Why this process's collective failed, as far as the peers tell: a peer that posted its
        failure or preemption, or one silent for a few beats (waiting up to `wait_s` for it to show):
        `verdict`'s (exit code, why, peer to blame), or None if none shows."""
        # the thread keeps watching meanwhile: if it reaches its verdict first, it ends the process
        deadline = time.monotonic() + min(wait_s, self.limit_s)
        while True:
            if self.store_lost:
                return 1, self.store_lost, 0
            try:
                self._bounded(self._poll)
            except Exception as e:  # noqa: BLE001
                return 1, self._store_lost(e), 0
            found = self.verdict(limit_s=3 * self.interval_s)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(self.interval_s / 2)

    def end(self, state: str, message: str = "", blame: int | None = None) -> None:
        """Post this process's end (main thread), then stop watching; the store host lingers."""
        self.stopping.set()
        self.thread.join(timeout=self.interval_s * 2 + self.limit_s)
        if self.store_lost:
            return
        try:
            self._bounded(self._post, state, message, blame)
            self._linger()
        except Exception as e:  # noqa: BLE001 - the store may be gone; ending anyway
            log.warning("watchdog: could not post this process's end: %s", e)


def active() -> Watchdog | None:
    return _active
