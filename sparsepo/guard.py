"""The non-finite guard: no run ends "done" with a broken model.

DeepSpeed skips an optimiser step whose gradients are not finite (`OVERFLOW! Skipping step`, in fp32
and bf16 too) and carries on; a non-finite learning rate or a divergence then trains nothing, or
writes NaN weights, and the run would still publish `final/` and exit 0. The loop hands every step
to `NonFiniteGuard.step`: a step with a non-finite loss or gradient norm, or one DeepSpeed skipped,
is counted and logged; more than `train.max_nonfinite_steps` of them fail the run. Weights are
checked (every rank's partitions, summed) after each counted step and before anything is published
(a checkpoint, the final model): a non-finite weight fails the run at once, so the last checkpoint
on disk is the last good one. Every rank reaches the same verdict (the loss is averaged over ranks,
the norm and the skip are global), so the weight check is a collective all ranks enter together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from sparsepo.engine.collectives import gather

log = logging.getLogger("sparsepo")


class NonFiniteError(RuntimeError):
    """The run diverged: too many non-finite steps, or non-finite weights. Nothing is published."""


@dataclass
class NonFiniteGuard:
    limit: int  # train.max_nonfinite_steps
    count: int = 0  # non-finite steps so far (seeded with DeepSpeed's restored skip count on resume)
    skipped: int = 0  # DeepSpeed's skip counter as last seen
    steps: list[int] = field(default_factory=list)  # the counted steps of this process (for the message)
    count_skips: bool = True  # False under fp16: its dynamic loss scaler skips steps by design while it calibrates

    @classmethod
    def for_engine(cls, limit: int, policy, precision: str = "fp32") -> "NonFiniteGuard":
        skipped = policy.skipped_steps()
        fp16 = precision == "fp16"
        return cls(limit=limit, count=0 if fp16 else skipped, skipped=skipped, count_skips=not fp16)

    def step(self, step: int, metrics: dict, policy) -> None:
        """After optimiser step `step` (1-based) with its rank-averaged metrics; raises NonFiniteError.
        The loss and grad norm are read where `metrics` has them (the log steps: no host sync between
        them); DeepSpeed's skip count, a host integer, every step (not under fp16, see `count_skips`)."""
        skipped = policy.skipped_steps()
        reasons = [f"{key} {metrics[key]}" for key in ("loss", "grad_norm")
                   if key in metrics and not math.isfinite(metrics[key])]
        if skipped > self.skipped and self.count_skips:
            reasons.append("DeepSpeed skipped the optimiser step (overflow)")
        self.skipped = skipped
        metrics["nonfinite_steps"] = self.count + bool(reasons)
        if not reasons:
            return
        self.count += 1
        self.steps.append(step)
        log.warning("non-finite step %d (%s): %d of at most %d allowed (train.max_nonfinite_steps)",
                    step, ", ".join(reasons), self.count, self.limit)
        self.check_weights(policy, f"after step {step}")
        if self.count > self.limit:
            raise NonFiniteError(
                f"{self.count} non-finite optimiser steps (this session: {self._listed()}) exceed "
                f"train.max_nonfinite_steps={self.limit}: the run diverged; nothing published. Lower optim.lr "
                f"or set optim.grad_clip, then resume from the last checkpoint (--resume auto)")

    def check_weights(self, policy, when: str) -> None:
        """Collective: raise NonFiniteError on every rank if any rank holds a non-finite weight."""
        bad = sum(gather(policy.nonfinite_weights()))
        if bad:
            raise NonFiniteError(
                f"{bad} non-finite weight(s) {when}: the model is broken and nothing was published (the last "
                f"checkpoint on disk is the last good one). Lower optim.lr or set optim.grad_clip, then resume "
                f"from it (--resume auto)")

    def _listed(self) -> str:
        shown = ", ".join(map(str, self.steps[:10]))
        return f"steps {shown}{', ...' if len(self.steps) > 10 else ''}" if self.steps else "none"
