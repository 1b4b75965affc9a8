"""Metrics: TRL's names for the pair statistics, a window that keeps each step's values on the
device until a log step (one host sync per log, none per step), the mean over policy ranks, and on
rank 0 TensorBoard scalars (`train/<name>`, `eval/<name>`), the resolved config as TensorBoard text
and hparams, a progress bar with ETA and a log line every N steps."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sparsepo.trackers import JsonlSink, close_trackers, flat_config, open_trackers

log = logging.getLogger("sparsepo")


def pair_values(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """Per pair, each (B,) and detached, under TRL's DPOTrainer names: `loss`, `rewards/chosen`,
    `rewards/rejected`, `rewards/accuracies` (1 where chosen > rejected, as TRL), `rewards/margins`
    (chosen − rejected), `logps/chosen`, `logps/rejected` (the policy's sequence log-probs). The
    rewards are the method's own (DPO's β·log-ratio, SimPO's β·average log-prob, ...)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"loss": losses.detach(), "rewards/chosen": c, "rewards/rejected": r,
            "rewards/accuracies": (c > r).to(c.dtype), "rewards/margins": c - r,
            "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}


def token_sums(fwd, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TRL 1.16's token-level statistics of a forward as (numerator, token count) pairs, 0-dim tensors, no
    host sync, so that callers pool them over micro-batches, batches or ranks before dividing:
    `entropy` (the policy's entropy over the response tokens of every row, chosen and rejected) and
    `mean_token_accuracy` (the chosen responses' tokens that are the policy's argmax) where the forward has
    `entropy` / `top1_ids` (its `stats`); `logits/chosen` / `logits/rejected` (the mean logit over every
    vocabulary entry at the positions that predict response tokens) where it has `logit_mean` (the plain path). `input_ids` and the response mask (N,T), chosen rows first (a mask may
    carry row weights: 0 drops a row)."""
    b = mask.shape[0] // 2
    out = {}
    if fwd.entropy is not None:
        hit = (fwd.top1_ids[:b] == input_ids[:b]).to(mask.dtype) * mask[:b]
        out["entropy"] = ((fwd.entropy * mask).sum(), mask.sum())
        out["mean_token_accuracy"] = (hit.sum(), mask[:b].sum())
    if fwd.logit_mean is not None:
        for name, rows in (("logits/chosen", slice(None, b)), ("logits/rejected", slice(b, None))):
            out[name] = ((fwd.logit_mean[rows] * mask[rows]).sum(), mask[rows].sum())
    return out


def token_stats(fwd, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`token_sums` of one micro-batch as means (0-dim tensors; 0 where a statistic has no token)."""
    return {k: num / den.clamp(min=1) for k, (num, den) in token_sums(fwd, input_ids, mask).items()}


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over all ranks (one all-reduce for the whole dict)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class MetricWindow:
    """The steps since the last log step. `add` takes one optimiser step's values (0-dim tensors stay
    where they are, on the device; plain numbers too) and only sums; `flush` moves them to the host
    in one transfer and returns each name's mean over the steps that reported it (FPO's SAE
    statistics come on log steps only)."""

    def __init__(self) -> None:
        self.sums: dict[str, object] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict) -> None:
        for k, v in values.items():
            v = v.detach().to(torch.float64) if torch.is_tensor(v) else float(v)
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self) -> dict[str, float]:
        keys = sorted(self.sums)
        dev = [k for k in keys if torch.is_tensor(self.sums[k])]
        where = self.sums[dev[0]].device if dev else None  # one transfer (a stray CPU statistic joins it)
        host = dict(zip(dev, torch.stack([self.sums[k].reshape(()).to(where) for k in dev]).cpu().tolist())) \
            if dev else {}
        out = {k: host.get(k, self.sums[k]) / self.counts[k] for k in keys}
        self.sums, self.counts = {}, {}
        return out


class MetricsLogger:
    """Writes `train/<name>` and `eval/<name>` scalars to TensorBoard, drives the progress bar,
    prints a log line; `config` (the resolved config as a nested dict) goes in as text and hparams."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, enabled: bool,
                 tensorboard: bool = True, progress: bool = True, log_every: int = 10, config: dict | None = None,
                 report_to: tuple[str, ...] = ("tensorboard",)):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.writer = None
        self.bar = None
        self.trackers: list = []
        if not enabled:
            return
        self.trackers = [JsonlSink(run_dir, start_step),  # metrics.jsonl, whatever report_to says
                         *open_trackers(report_to, run_dir, config=config)]  # wandb, mlflow
        if tensorboard and "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides the steps the interrupted one logged after its last checkpoint
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
            if config is not None:
                self._write_config(config)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def _write_config(self, config: dict) -> None:
        import yaml
        from torch.utils.tensorboard.summary import hparams

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "```", 0)
        for summary in hparams(flat_config(config), {}):  # into this run's own event file (no sub-run)
            self.writer.file_writer.add_summary(summary)

    def due(self, step: int) -> bool:
        """Whether `step` (1-based) is a log step: the first and every `log_every`-th. Same answer on
        every rank (enabled or not), so per-step statistics computed only when due stay in step."""
        return step % self.log_every == 0 or step == 1

    def advance(self) -> None:
        """One optimiser step done (the progress bar; no metric values, so no host sync)."""
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        for tracker in self.trackers:
            tracker.log({f"{prefix}/{name}": value for name, value in scalars.items()}, step=step)
        shown = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "lr", "grad_norm", "step_time",
                 "ref_wait")
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", acc=f"{scalars.get('rewards/accuracies', 0):.2f}")
        text = " ".join(f"{k}={scalars[k]:.4g}" for k in shown if k in scalars)
        msg = f"{prefix} step {step} {text}" if prefix != "train" else f"step {step} {text}"
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.info(msg)

    def close(self) -> None:
        close_trackers(self.trackers)
        self.trackers = []
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
