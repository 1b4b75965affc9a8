"""The schedule: the pure contract the policy ranks and the reference group both walk.

Which dataset rows policy rank p consumes at (step, micro-step) is a pure function of the config,
the dataset size and the number of policy ranks. The trainer walks `slots(start, total, [rank])`;
the reference server walks `rounds(...)` — the same slots, grouped into lockstep rounds across its
replicas — so the two sides cannot drift apart, and the reference group needs no requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby
from typing import Iterator, Sequence

from sparsepo.data import epoch_order, micro_batch_indices, steps_per_epoch


@lru_cache(maxsize=4)
def _order(num_rows: int, seed: int, epoch: int) -> list[int]:
    return epoch_order(num_rows, seed, epoch)  # one permutation per epoch, not one per micro-batch


@dataclass(frozen=True)
class Slot:
    """One micro-batch of one policy rank."""

    step: int
    micro: int
    policy_rank: int  # index among the policy ranks (= the rank in the policy's own world)
    rows: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Schedule:
    num_rows: int
    dp: int  # policy ranks
    micro_batch_size: int
    grad_accum: int
    seed: int

    @classmethod
    def from_config(cls, cfg, *, num_rows: int, dp: int) -> "Schedule":
        t = cfg.train
        return cls(num_rows=num_rows, dp=dp, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                   seed=t.seed)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_rows, self.global_batch)

    def rows_for(self, step: int, micro: int, policy_rank: int) -> tuple[int, ...]:
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_rows} pairs cannot fill one global batch of {self.global_batch}")
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return tuple(micro_batch_indices(_order(self.num_rows, self.seed, epoch), step=in_epoch,
                                         micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum,
                                         dp_size=self.dp, dp_rank=policy_rank, micro_step=micro))

    def slots(self, start: int, total: int, policy_ranks: Sequence[int]) -> Iterator[Slot]:
        """Steps start..total-1, each micro-step, each of `policy_ranks` in the given order."""
        for step in range(start, total):
            for micro in range(self.grad_accum):
                for p in policy_ranks:
                    yield Slot(step, micro, p, self.rows_for(step, micro, p))

    def steps(self, start: int, total: int, policy_rank: int) -> Iterator[tuple[int, list[Slot]]]:
        """What one policy rank walks: (step, its micro-batch slots)."""
        for step, slots in groupby(self.slots(start, total, [policy_rank]), key=lambda s: s.step):
            yield step, list(slots)

    def rounds(self, start: int, total: int, replicas: Sequence[Sequence[int]]) -> Iterator[tuple[Slot, ...]]:
        """What the reference group walks: replica r serves the policy ranks `replicas[r]` (all of the
        same length), in lockstep — round i holds every replica's i-th slot. Every policy rank's slots
        arrive in exactly the order of `steps(..., policy_rank)`."""
        if len({len(r) for r in replicas}) > 1:
            raise ValueError(f"replicas serve unequal numbers of policy ranks: {[list(r) for r in replicas]}")
        return zip(*(self.slots(start, total, served) for served in replicas))


def eval_due(step: int, total: int, every_steps: int) -> bool:
    """Whether the run evaluates after optimiser step `step` (1-based): after every `every_steps`-th
    step (0: never in between) and after the last (`eval.every_steps`)."""
    return step == total or (every_steps > 0 and step % every_steps == 0)
