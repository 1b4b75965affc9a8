"""Metrics: mean over policy ranks, TensorBoard scalars, a progress bar with ETA and a log line
every N steps, all on rank 0."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("sparsepo")


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over all ranks (one all-reduce for the whole dict)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class MetricsLogger:
    """Writes `train/<name>` scalars to TensorBoard, drives the progress bar, prints a log line."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool,
                 tensorboard: bool = True, progress: bool = True, log_every: int = 10):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides the steps the interrupted one logged after its last checkpoint
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def due(self, step: int) -> bool:
        """Whether `step` (1-based) is a log step: the first and every `log_every`-th. Same answer on
        every rank (enabled or not), so per-step statistics computed only when due stay in step."""
        return step % self.log_every == 0 or step == 1

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in scalars:  # log steps only (trainer.train reads device values back then)
                self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", acc=f"{scalars.get('accuracy', 0):.2f}")
        if self.due(step):
            shown = ("loss", "accuracy", "margin", "lr", "grad_norm", "step_time", "ref_wait")
            text = " ".join(f"{k}={scalars[k]:.4g}" for k in shown if k in scalars)
            msg = f"step {step} {text}"
            if self.bar is not None:
                self.bar.write(msg)
            else:
                log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
