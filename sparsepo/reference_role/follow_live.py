"""TR-DPO with a live reference group: the reference follows the policy (`sparsepo.follow`) while a
separate pipeline-parallel group serves it.

Where the moving reference lives: on the policy ranks, as a *shadow* — each of the P policy ranks
keeps a 1/P slice of every flattened parameter (on the CPU, in the reference's dtype), so the state
a checkpoint needs is the policy's own (`reference-rank{r}.pt`, like inline mode's) and the group
holds nothing a resume would have to recover. At a sync step every policy rank walks the policy's
parameters once (`PolicyEngine.gathered_parameters`: one full parameter at a time under ZeRO-3),
mixes its slice, θ_ref ← α·θ + (1 − α)·θ_ref (`follow.mix_`, the elementwise update inline mode
applies to its whole copy), and the slices are gathered on the first policy rank, which sends the
mixed parameter (`bridge.WEIGHTS`) to every reference rank whose stage holds it — each stage only its
own parameters, named as the model names them (a tied head receives the embedding it is tied to).

Who holds what: at start-up every stage of replica 0 announces its parameters and shapes
(`bridge.MANIFEST`); the first policy rank checks them against the policy (`routes`: the same
architecture, every parameter on some stage) before anything trains.

When: the group scores the rows of step k with the reference after every sync step ≤ k. It scores ahead
of the policy as usual, but before the first round of a step k that follows a sync (k a multiple of
`reference.sync_steps`) it waits for the policy's weights — so the policy's first batch after a sync is
not overlapped (one reference scoring per sync); a resume from step k ≥ sync_steps starts by sending the
checkpoint's reference (`send_all`); on another number of policy ranks every rank's saved slices are
put together and re-cut (`load_resharded`). A moving reference is never read from, or written through
to, the training reference cache. Evaluation: right after each sync an evaluation will use
(`eval_syncs`), the group scores the held-out pairs into that reference's own eval cache
(`eval_version`, `server.follow_evals`), which the policy's `sources.FollowingEvalSource` waits for;
the last step's reference is sent as well when the last evaluation needs it (`last_eval_moves`).
"""

from __future__ import annotations

import logging
import math

import torch

from sparsepo import bridge as br
from sparsepo.follow import mix_

log = logging.getLogger("sparsepo")


class FollowError(RuntimeError):
    """The live group cannot follow this policy (another architecture, a parameter on no stage)."""


def shard_bounds(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """(lo, hi, part): rank `rank` of `world` holds elements [lo, hi) of a flattened parameter of
    `numel` elements; every slice is padded to `part` = ceil(numel / world) for the gather (the
    last ranks' slices may be shorter, or empty)."""
    part = max(1, math.ceil(numel / world))
    lo = min(rank * part, numel)
    return lo, min(lo + part, numel), part


def syncs_before(start: int, sync_steps: int) -> bool:
    """Whether a run starting at optimiser step `start` (0-based) has moved its reference already
    (a sync after step sync_steps, 2·sync_steps, ... ≤ start)."""
    return start >= sync_steps


def eval_version(cfg, step: int) -> str:
    """The name of the reference a live TR-DPO run evaluates with after step `step`: the run's config
    and how many syncs it has had (`step // sync_steps`); the group writes that eval cache."""
    from sparsepo.config import config_fingerprint

    return f"trdpo-{config_fingerprint(cfg)[:12]}-v{step // cfg.reference.sync_steps}"


def eval_syncs(cfg, start: int, total: int) -> set[int]:
    """The sync counts (step // sync_steps) at which a live TR-DPO run from `start` to `total` evaluates."""
    from sparsepo.schedule import eval_due

    return {s // cfg.reference.sync_steps for s in range(start + 1, total + 1)
            if eval_due(s, total, cfg.eval.every_steps)}


def routes(manifests: dict[int, dict[str, tuple]], shapes: dict[str, tuple], aliases: dict[str, str]
           ) -> dict[str, list[tuple[int, str]]]:
    """policy parameter name -> [(stage, the name that stage holds it under)], from each stage's
    manifest {name: shape}; `aliases` maps a tied parameter's other names to the policy's. Refuses a
    stage parameter the policy lacks or shapes otherwise, and a policy parameter no stage holds."""
    out: dict[str, list[tuple[int, str]]] = {}
    for stage, held in sorted(manifests.items()):
        for name, shape in held.items():
            own = aliases.get(name, name)
            if own not in shapes:
                raise FollowError(f"TR-DPO live: reference stage {stage} holds '{name}', which the policy has not: "
                                  f"the reference must be the policy's architecture (reference.path)")
            if tuple(shape) != tuple(shapes[own]):
                raise FollowError(f"TR-DPO live: reference stage {stage} holds '{name}' of shape {tuple(shape)}, the "
                                  f"policy's is {tuple(shapes[own])}: the reference must be the policy's architecture")
            out.setdefault(own, []).append((stage, name))
    missing = [n for n in shapes if n not in out]
    if missing:
        raise FollowError(f"TR-DPO live: the policy's {missing[:3]}{'...' if len(missing) > 3 else ''} "
                          f"({len(missing)} parameter(s)) are on no reference stage, so the reference could not follow them")
    return out


class Shadow:
    """This policy rank's slice of the moving reference: parameter name -> a flat CPU tensor (its part
    of the flattened parameter, `shard_bounds`)."""

    def __init__(self, shapes: dict[str, tuple], *, rank: int, world: int, dtype: torch.dtype):
        self.shapes, self.rank, self.world, self.dtype = dict(shapes), rank, world, dtype
        self.shards = {}
        for name, shape in self.shapes.items():
            lo, hi, _ = shard_bounds(math.prod(shape), rank, world)
            self.shards[name] = torch.zeros(hi - lo, dtype=dtype)

    def _slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        lo, hi, _ = shard_bounds(full.numel(), self.rank, self.world)
        return full.reshape(-1)[lo:hi]

    def fill(self, named_tensors) -> None:
        """Set every slice from (name, full tensor) pairs (the reference's starting weights); names the
        shadow does not hold (a tied head's second name) are skipped; every one it holds must come."""
        filled = set()
        for name, value in named_tensors:
            if name in self.shards:
                if tuple(value.shape) != tuple(self.shapes[name]):
                    raise FollowError(f"TR-DPO live: the reference's '{name}' has shape {tuple(value.shape)}, the "
                                      f"policy's {tuple(self.shapes[name])}: the reference must be the policy's architecture")
                self.shards[name].copy_(self._slice(name, value.detach()))
                filled.add(name)
        missing = sorted(set(self.shards) - filled)
        if missing:
            raise FollowError(f"TR-DPO live: the reference has no {missing[:3]} ({len(missing)} of the policy's "
                              f"parameters): the reference must be the policy's architecture (reference.path)")

    @torch.no_grad()
    def mix_(self, name: str, policy_value: torch.Tensor, alpha: float) -> None:
        """This rank's slice ← α·policy + (1 − α)·slice (`follow.mix_`), from the full policy parameter."""
        mix_(self.shards[name], self._slice(name, policy_value).to("cpu"), alpha)

    def gathered(self, name: str, device) -> torch.Tensor | None:
        """The full mixed parameter on policy rank 0 (on the CPU), None on the others; collective over
        the policy's world (the slices travel on `device`: NCCL needs device tensors)."""
        from sparsepo.engine.collectives import gather_tensors

        numel = math.prod(self.shapes[name])
        _, _, part = shard_bounds(numel, self.rank, self.world)
        mine = torch.zeros(part, dtype=self.dtype, device=device)
        mine[:self.shards[name].numel()] = self.shards[name].to(device)
        parts = gather_tensors(mine, dst=0)
        if parts is None:
            return None
        return torch.cat([p.cpu() for p in parts])[:numel].view(self.shapes[name])

    def nbytes(self) -> int:
        """The whole reference's size (what one sync sends, once per replica)."""
        return sum(math.prod(shape) for shape in self.shapes.values()) * torch.finfo(self.dtype).bits // 8

    def state_dict(self) -> dict:
        return {"world": self.world, "rank": self.rank, "shards": dict(self.shards)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world") != self.world or state.get("rank") != self.rank:
            raise FollowError(f"TR-DPO live: the checkpoint's reference slice is rank {state.get('rank')} of "
                              f"{state.get('world')} policy ranks, this is rank {self.rank} of {self.world}: "
                              f"load every rank's slice (`load_resharded`)")
        shards = state["shards"]
        if set(shards) != set(self.shards) or any(shards[n].numel() != self.shards[n].numel() for n in shards):
            raise FollowError("TR-DPO live: the checkpoint's reference slices do not match the policy's parameters")
        for name, value in shards.items():
            self.shards[name].copy_(value)

    def load_resharded(self, states: list[dict]) -> None:
        """Every rank's slices of another world size (in rank order), put together and cut for this one."""
        if [s.get("rank") for s in states] != list(range(len(states))) or \
                any(s.get("world") != len(states) for s in states):
            raise FollowError(f"TR-DPO live: the checkpoint's reference slices are not ranks 0..{len(states) - 1} of "
                              f"{len(states)}")
        self.fill((name, torch.cat([s["shards"][name] for s in states]).view(shape))
                  for name, shape in self.shapes.items())


class PolicyFollower:
    """The policy side: the shadow, and (on the first policy rank) where each parameter goes."""

    def __init__(self, shadow: Shadow, *, bridge, routes: dict | None, stage_ranks: dict[int, list[int]],
                 device, window: int, start: int, total: int, sync_steps: int, send_last: bool = False):
        """`send_last`: the group needs the reference of the last step too (an evaluation after it)."""
        self.shadow, self.bridge, self.routes, self.stage_ranks = shadow, bridge, routes, stage_ranks
        self.device, self.start, self.total, self.sync_steps = device, start, total, sync_steps
        self.outbox = br.Outbox(bridge, window) if routes is not None else None
        self.send_last = send_last
        self.step = start  # the last step the reference followed the policy at (or the start)

    def follow(self, policy, alpha: float, step: int) -> None:
        """After optimiser step `step` (1-based): mix every slice, and send the mixed parameters unless
        the group has nothing left to score with them. Collective over the policy ranks."""
        send = step < self.total or self.send_last
        self.step = step
        for name, value in policy.gathered_parameters():
            self.shadow.mix_(name, value, alpha)
            if send:
                self._send(name)

    def send_all(self) -> None:
        """A resumed run's reference, as its checkpoint holds it (collective over the policy ranks)."""
        for name in self.shadow.shapes:
            self._send(name)

    def _send(self, name: str) -> None:
        value = self.shadow.gathered(name, self.device)
        if value is None:
            return
        for stage, held_as in self.routes[name]:
            for dst in self.stage_ranks[stage]:
                self.outbox.send(dst, br.WEIGHTS, [held_as], [{"value": value}])

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The checkpoint's slice; sent to the group at once when the run had moved its reference."""
        self.shadow.load_state_dict(state)
        self._restored()

    def load_resharded(self, states: list[dict]) -> None:
        """A checkpoint of another number of policy ranks: every rank's slices, re-cut; then as above."""
        self.shadow.load_resharded(states)
        self._restored()

    def _restored(self) -> None:
        if syncs_before(self.start, self.sync_steps):
            self.send_all()
            if self.outbox is not None:
                log.info("TR-DPO live: the checkpoint's reference (step %d) sent to the reference group", self.start)


def open_policy_follower(cfg, *, bridge, topo, policy, ctx, start: int, total: int) -> PolicyFollower:
    """Every policy rank: the manifests (first policy rank: received from replica 0's stages, checked),
    and the shadow filled with the reference's starting weights (`StageLoader.named_tensors`, one
    pipeline item at a time). Call before the policy's `Inbox` exists (it would take the manifests)."""
    from sparsepo.config.paths import reference_path
    from sparsepo.engine.collectives import on_one_rank
    from sparsepo.reference.stage_loader import PRECISIONS, StageLoader

    shapes = policy.parameter_shapes()
    first = ctx.rank == 0
    stage_ranks = {s: [topo.stage_ranks(r)[s] for r in range(topo.num_replicas)] for s in range(topo.num_stages)}

    def check():
        manifests = {}
        for stage, ranks in stage_ranks.items():
            msg = br.recv(bridge, ranks[0])
            if msg.kind != br.MANIFEST:
                raise br.BridgeError(f"reference rank {ranks[0]} opened with {br.KINDS.get(msg.kind)}, not its manifest")
            manifests[stage] = msg.records[0]
        return routes(manifests, shapes, policy.tied_names())

    table = on_one_rank(check, src=0)
    shadow = Shadow(shapes, rank=ctx.rank, world=ctx.world_size, dtype=PRECISIONS[cfg.train.precision])
    shadow.fill(StageLoader(reference_path(cfg), cfg.train.precision).named_tensors())
    if first:
        log.info("TR-DPO live: the reference follows the policy every %d step(s) (α = %s); %d parameters over "
                 "%d stage(s), %.1f MiB sent to the group per sync, this rank holds 1/%d of them",
                 cfg.reference.sync_steps, cfg.reference.sync_alpha, len(shapes), topo.num_stages,
                 shadow.nbytes() / 2**20, ctx.world_size)
    return PolicyFollower(shadow, bridge=bridge, routes=table if first else None, stage_ranks=stage_ranks,
                          device=ctx.device, window=cfg.reference.window, start=start, total=total,
                          sync_steps=cfg.reference.sync_steps, send_last=last_eval_moves(cfg, start, total))


def last_eval_moves(cfg, start: int, total: int) -> bool:
    """Whether the run evaluates with the reference moved at its very last step (so the group must
    receive it after serving every round)."""
    has_eval = bool(cfg.eval.path or cfg.eval.split or cfg.eval.fraction)
    return has_eval and total > start and total % cfg.reference.sync_steps == 0


class GroupFollower:
    """The reference side: this stage's parameters by name, replaced by the policy's mixed ones."""

    def __init__(self, bridge, *, block, src: int, start: int, sync_steps: int):
        self.bridge, self.src, self.sync_steps = bridge, src, sync_steps
        self.params = dict(block.named_reference)
        self.synced = start
        self.seq = 0
        self.on_sync = None  # called with the step after each receive (the eval cache of that reference)
        self.recv = lambda: br.recv(bridge, src)  # SPO: the inbox of the first policy rank's requests, where one is

    def announce(self) -> None:
        """Replica 0: tell the first policy rank what this stage holds."""
        manifest = {name: tuple(p.shape) for name, p in self.params.items()}
        for work in br.send(self.bridge, self.src, br.Message(kind=br.MANIFEST, seq=0, example_ids=[],
                                                              records=[manifest])):
            work.wait()

    def due(self, step: int) -> bool:
        """Whether the weights must arrive before scoring step `step` (0-based)."""
        return step > self.synced and step % self.sync_steps == 0

    @torch.no_grad()
    def receive(self, step: int) -> None:
        """Every parameter of this stage, once each, from the first policy rank."""
        got = set()
        while len(got) < len(self.params):
            msg = self.recv()
            (name,) = msg.example_ids or [None]
            if msg.kind != br.WEIGHTS or msg.seq != self.seq or name not in self.params or name in got:
                raise br.BridgeError(f"TR-DPO live: policy rank {self.src} sent {br.KINDS.get(msg.kind)} #{msg.seq} for "
                                     f"{name!r}; this stage expected weights #{self.seq} for one of its "
                                     f"{len(self.params) - len(got)} parameters not yet received")
            self.params[name].data.copy_(msg.records[0]["value"])
            got.add(name)
            self.seq += 1
        self.synced = step
        if self.on_sync is not None:
            self.on_sync(step)


def open_group_follower(cfg, *, bridge, scorer, topo, role, start: int) -> GroupFollower:
    """Every reference rank: its stage's parameters (`StageLoader` names them); replica 0 announces
    them; a run resumed after a sync first receives the checkpoint's reference."""
    follower = GroupFollower(bridge, block=scorer.stage_block, src=topo.policy_ranks()[0], start=start,
                             sync_steps=cfg.reference.sync_steps)
    if role.replica == 0:
        follower.announce()
    if syncs_before(start, cfg.reference.sync_steps):
        follower.receive(start)
    return follower
