"""Preemption: Slurm's --signal (SIGUSR1) or SIGTERM asks every rank to finish its step, write a
checkpoint, and exit with EXIT_PREEMPTED, which the sbatch templates turn into `scontrol requeue`.
Kept apart from the trainer so the entry point can install it before any slow import or start-up."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 3  # the sbatch templates turn this into `scontrol requeue`


class Preempted(Exception):
    """Raised after the checkpoint that a preemption signal asked for has been written."""


class PreemptionFlag:
    """SIGUSR1 (Slurm --signal) or SIGTERM sets a flag; the loop checks it after each step on every
    rank (one all-reduce), so all ranks stop at the same step and checkpoint together."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
