"""Process-group start-up and clean shutdown, through DeepSpeed (it must own the world it runs in).

`init_distributed` joins (or makes) this role's torch.distributed world: gloo on CPU, NCCL on GPUs;
a plain `python` run becomes a world of one, so every code path is the distributed one.
`shutdown` leaves without the gloo exit crash (docs/field_notes.md, "Exit crash").
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # Must be set before deepspeed is imported: it picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from sparsepo.launch.devices import SHARED_VAR, backend_for, check_device_index  # noqa: E402
from sparsepo.launch.environ import torch_dist_env  # noqa: E402


def _without_shm_all_reduce() -> None:
    """DeepSpeed's CPU backend builds its shared-memory all-reduce op (deepspeed_shm_comm: a C++ JIT
    build at a machine's first launch, setuptools imported, a 66 MB /dev/shm buffer per rank that
    DeepSpeed never unlinks) for `inference_all_reduce` only, which its inference and AutoTP layers
    call and training never does (without the op that call falls back to torch.distributed's
    all-reduce, the same sum). Not building it changes no collective of a training step."""
    # by module name: the attribute `deepspeed.comm.torch` is the torch package, not that module
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


_without_shm_all_reduce()  # before any DeepSpeed backend starts, in every role


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CHILDREN: list = []  # processes of ours to stop at shutdown (os._exit runs no atexit handler)


def stop_at_shutdown(process) -> None:
    """Kill `process` (a multiprocessing.Process) when this rank shuts down: DeepSpeed's decoupled
    checkpoint writer waits on its queue forever otherwise (and, forked from a rank, it inherits the
    rank's SIGTERM handler). Whatever it was still writing belongs to a checkpoint that was never
    sealed, which no resume uses."""
    _CHILDREN.append(process)


def children_die_with_rank() -> None:
    """Processes this rank forks from now on are killed when it dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG, set in each child), so a killed rank leaves no writer behind."""
    def in_child() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() == 1:  # the rank died before the line above
            os._exit(0)

    import ctypes
    import signal

    os.register_at_fork(after_in_child=in_child)
_TIMEOUT_S = 1800.0  # torch's default; live mode lowers it (set_group_timeout) before the world starts


def set_group_timeout(seconds: float) -> None:
    """The timeout of the process group `init_distributed` will start (live mode ties it to
    reference.timeout_s: sparsepo.liveness.group_timeout_s)."""
    global _TIMEOUT_S
    _TIMEOUT_S = float(seconds)


def init_distributed(timeout_s: float | None = None) -> DistContext:
    """Start (or join) the torch.distributed world: gloo on CPU, NCCL on GPUs (gloo where two of its
    processes share a GPU: `sparsepo.launch.devices.backend_for`). A plain `python`
    run becomes a world of one, so every code path is the distributed one."""
    timeout_s = _TIMEOUT_S if timeout_s is None else timeout_s
    # whatever launched us (deepspeed, torchrun, srun, mpirun, plain python): the one parser
    os.environ.update(torch_dist_env(os.environ))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # the device index (sparsepo.launch.devices)
    if torch.cuda.is_available():
        check_device_index(local_rank, torch.cuda.device_count(),
                           int(os.environ.get("SPARSEPO_GLOBAL_LOCAL_RANK", local_rank)))
    if not dist.is_initialized():
        backend = backend_for(cuda=torch.cuda.is_available(), shared=os.environ.get(SHARED_VAR) == "1")
        _start_group_on_own_store(backend, datetime.timedelta(seconds=timeout_s), local_rank)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device)


def _start_group_on_own_store(backend: str, timeout: datetime.timedelta, local_rank: int) -> None:
    """The process group, on a TCPStore that rank 0 serves on MASTER_ADDR only (torch's env:// start-up
    listens on every interface); DeepSpeed's init then finds the group started. Under torchrun the
    agent's store already serves MASTER_PORT (torchrun's own, on every interface): left to env://."""
    from sparsepo.bridge import listen_on

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout, use_libuv=False,
                          master_listen_fd=listen_on(addr, port) if rank == 0 else None)
    device = {"device_id": torch.device("cuda", local_rank)} if torch.cuda.is_available() and world > 1 else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **device)


def shutdown(code: int = 0) -> None:
    """Leave without the gloo exit crash (docs/field_notes.md, "Exit crash"): barrier, destroy the group,
    finalise MPI, flush, and `os._exit` so no gloo worker thread is torn down by the interpreter."""
    try:
        if dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    except Exception as e:  # a dead peer must not turn a clean exit into a hang
        log.warning("process group shutdown: %s", e)
    _release_and_flush()
    if "mpi4py" in sys.modules and code == 0:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    os._exit(code)


def _release_and_flush() -> None:
    for child in _CHILDREN:
        if child.is_alive():
            child.kill()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def abort(code: int) -> None:
    """Leave now, from any thread, while the main thread may be blocked in a collective (the live
    watchdog): no barrier, no group teardown (either could block on the lost peer)."""
    _release_and_flush()
    os._exit(code)


