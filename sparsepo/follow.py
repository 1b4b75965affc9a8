"""TR-DPO: a reference that follows the policy (Gorbatovski et al. 2024, "Learn Your Reference Model
for Real Good Alignment", arXiv 2404.09656, §3): every τ = `reference.sync_steps` optimiser steps,

    θ_ref ← α·θ + (1 − α)·θ_ref      (soft update, α = `reference.sync_alpha` in (0, 1])
    θ_ref ← θ                        (hard update: α = 1)

TRL's `sync_ref_model` with `ref_model_mixup_alpha` / `ref_model_sync_steps` (its defaults 0.6 / 512;
here off unless `reference.sync_alpha` is set). Inline mode updates the frozen copy on each policy rank
from the policy's parameters, gathered one at a time under ZeRO-3 (`PolicyEngine.mix_into`). Live mode
(`sparsepo.reference_role.follow_live`) keeps the moving reference on the policy ranks, each rank a
1/P slice, mixes it there and streams each mixed parameter to the stages that hold it. A cache cannot
serve a moving reference and is refused (`sync_problem`). The reference's weights (inline) or this
rank's slice of them (live) go into each checkpoint (`reference-rank{r}.pt`) so that a resume
continues from the reference the run had, not from the initial one — on another world size too
(`trainer.restore_reference`: inline reads any rank's copy, live re-cuts every rank's slices).
"""

from __future__ import annotations

from typing import Iterable

import torch


def sync_problem(cfg, spec) -> str | None:
    """What stops `reference.sync_alpha` in this run, naming the keys and the fix; None when it can run
    (or is off)."""
    r = cfg.reference
    if r.sync_alpha is None:
        return None
    if not (isinstance(r.sync_alpha, (int, float)) and 0.0 < r.sync_alpha <= 1.0):
        return f"reference.sync_alpha={r.sync_alpha!r} must be in (0, 1] (1 = hard update), or null (a frozen reference)"
    if not (isinstance(r.sync_steps, int) and r.sync_steps >= 1):
        return f"reference.sync_steps={r.sync_steps!r} must be an integer >= 1"
    if getattr(cfg, "lora", None) is not None and cfg.lora.r > 0:
        return ("reference.sync_alpha (TR-DPO) moves the reference, and with lora.r > 0 the inline reference is "
                "the policy itself with its adapters off (no copy to move): set reference.sync_alpha=null or lora.r=0")
    if r.mode in ("cache", "precompute"):
        return (f"reference.sync_alpha (TR-DPO) moves the reference during training, and a reference.mode={r.mode} "
                f"cache holds one fixed reference's outputs: use reference.mode=inline, or reference.sync_alpha=null")
    if spec.needs_oracle_scores or not (spec.reference_outputs or spec.needs_policy_samples):
        return (f"reference.sync_alpha (TR-DPO) updates the reference model, and method '{spec.name}' reads "
                f"{'an oracle pair, not the reference' if spec.needs_oracle_scores else 'no reference'}: "
                f"set reference.sync_alpha=null")
    return None


def due(cfg, step: int) -> bool:
    """Whether the reference follows the policy after optimiser step `step` (1-based)."""
    return cfg.reference.sync_alpha is not None and step % cfg.reference.sync_steps == 0


@torch.no_grad()
def mix_(target: torch.Tensor, source: torch.Tensor, alpha: float) -> None:
    """target ← α·source + (1 − α)·target, in place, in target's dtype (source cast to it); α = 1
    copies source exactly."""
    if target.shape != source.shape:
        raise ValueError(f"TR-DPO: reference parameter of shape {tuple(target.shape)} cannot follow a policy "
                         f"parameter of shape {tuple(source.shape)}: the reference must be the policy's architecture")
    if alpha == 1.0:
        target.copy_(source)
    else:
        target.mul_(1.0 - alpha).add_(source.to(target.dtype), alpha=alpha)


def mix_named(target: torch.nn.Module, sources: Iterable[tuple[str, torch.Tensor]], alpha: float) -> int:
    """Mix every (name, tensor) of `sources` into `target`'s parameter of that name; returns how many.
    Refuses a name `target` lacks (the two models must be the same architecture)."""
    params = dict(target.named_parameters())
    count = 0
    for name, value in sources:
        if name not in params:
            raise ValueError(f"TR-DPO: the reference has no parameter '{name}' (the policy has): the reference "
                             f"must be the policy's architecture (reference.path)")
        mix_(params[name].data, value, alpha)
        count += 1
    if count != len(params):
        raise ValueError(f"TR-DPO: the policy has {count} parameters, the reference {len(params)}")
    return count
