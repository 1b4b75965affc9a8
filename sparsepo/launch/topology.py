"""Who is who in one launch: global rank -> role (policy or reference). Pure arithmetic, no environment.

    topo = Topology.build(cfg.topology, world_size, ranks_per_node=8)   # refuses bad shapes, before any group
    topo.role_of(rank)                                                  # Role(kind="policy", role_rank=..., ...)

`Topology.from_launch(cfg, launch)` does the same for a `sparsepo.launch.environ.LaunchEnv`; the
environment each role's process gets is `sparsepo.launch.process`.

Layout
------
With P policy ranks and a reference group of R replicas x S pipeline stages (R*S reference ranks):

* ``placement="last"``: policy = global ranks 0..P-1; replica r, stage s = global rank P + r*S + s
  (the stages of a replica are neighbours, so a replica stays on one node when it fits; with
  whole nodes for the reference it occupies the last nodes).
* ``placement="interleaved"``: the world is cut into R*S equal blocks of W/(R*S) consecutive ranks;
  the *last* rank of block j is reference rank j in (replica, stage) order, the others are policy
  ranks. Needs W % (R*S) == 0 and, with ``ranks_per_node`` known, blocks that line up with nodes
  (block % ranks_per_node == 0 or ranks_per_node % block == 0) so every node holds the same number
  of reference ranks (or whole nodes alternate).

Global rank 0 is always a policy rank, in both placements.

Role ranks
----------
* policy: role rank = policy index (0..P-1, in global-rank order) of P.
* reference: role rank = stage * R + replica of R*S. This is DeepSpeed's own
  ``PipeDataParallelTopology(num_pp=S, num_dp=R)`` order (axes ['pipe', 'data'], rank =
  pipe * num_dp + data), so a plain ``PipelineModule(num_stages=S)`` over the reference world puts
  every process on the stage this module assigned it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from sparsepo.launch.errors import TopologyError

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from sparsepo.config import TopologyConfig
    from sparsepo.launch.environ import LaunchEnv

__all__ = ["PLACEMENTS", "Role", "Topology", "TopologyError"]

PLACEMENTS = ("last", "interleaved")


@dataclass(frozen=True, kw_only=True)
class Role:
    """One process's role. Policy: ``index`` (= role_rank) of ``num_policy``. Reference: ``stage``
    of ``num_stages`` in ``replica`` of ``num_replicas``; role_rank = stage * num_replicas + replica
    (DeepSpeed's pipe-major order)."""

    kind: str
    global_rank: int
    role_rank: int
    role_world_size: int
    stage: int | None = None
    replica: int | None = None
    num_stages: int | None = None
    num_replicas: int | None = None
    index: int | None = None
    num_policy: int | None = None

    @property
    def is_policy(self) -> bool:
        return self.kind == "policy"

    @property
    def is_reference(self) -> bool:
        return self.kind == "reference"

    @property
    def is_first_stage(self) -> bool:
        return self.is_reference and self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.is_reference and self.num_stages is not None and self.stage == self.num_stages - 1

    def label(self) -> str:
        if self.is_policy:
            return f"policy {self.index}/{self.num_policy}"
        return f"reference replica {self.replica}/{self.num_replicas} stage {self.stage}/{self.num_stages}"


def _cfg_value(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _check_int(name: str, value: Any, minimum: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise TopologyError(f"{name}={value} must be at least {minimum}{why}")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True, kw_only=True)
class Topology:
    """The rank -> role map of one launch. Build it with `Topology.build` (which refuses bad shapes)."""

    world_size: int
    num_policy: int
    num_stages: int
    num_replicas: int
    placement: str
    ranks_per_node: int | None
    num_layers: int | None
    roles: tuple[Role, ...] = field(repr=False)

    @property
    def num_reference(self) -> int:
        return self.num_stages * self.num_replicas

    @property
    def live(self) -> bool:
        """True when there is a reference group (live mode); False in cache mode."""
        return self.num_reference > 0

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: "TopologyConfig | Any", world_size: int, *, ranks_per_node: int | None = None,
              num_layers: int | None = None) -> "Topology":
        """Map ``world_size`` ranks to roles per ``cfg`` (a TopologyConfig or anything with
        reference_ranks / pipeline_stages / placement). Raises `TopologyError` before any process
        group exists when the shape cannot work."""
        n_ref = _cfg_value(cfg, "reference_ranks", 0)
        stages = _cfg_value(cfg, "pipeline_stages", 1)
        placement = _cfg_value(cfg, "placement", "last")

        _check_int("world_size", world_size, 1)
        _check_int("topology.reference_ranks", n_ref, 0, " (0 = no reference group)")
        _check_int("topology.pipeline_stages", stages, 1, " (1 = no pipeline)")
        if ranks_per_node is not None:
            _check_int("ranks_per_node", ranks_per_node, 1)
        if num_layers is not None:
            _check_int("num_layers", num_layers, 1)
        if not isinstance(placement, str) or placement not in PLACEMENTS:
            raise TopologyError(
                f"topology.placement={placement!r} is not a placement; valid values: "
                f"{', '.join(repr(p) for p in PLACEMENTS)}")
        if ranks_per_node is not None and world_size % ranks_per_node:
            raise TopologyError(
                f"world_size={world_size} is not a multiple of ranks_per_node={ranks_per_node}: "
                f"{world_size} % {ranks_per_node} = {world_size % ranks_per_node}; nodes must hold "
                f"equal numbers of ranks (pass ranks_per_node=None for uneven nodes)")

        if n_ref == 0:  # cache mode: pipeline_stages only matters to the precompute run
            roles = tuple(Role(kind="policy", global_rank=g, role_rank=g, role_world_size=world_size,
                               index=g, num_policy=world_size) for g in range(world_size))
            return cls(world_size=world_size, num_policy=world_size, num_stages=stages, num_replicas=0,
                       placement=placement, ranks_per_node=ranks_per_node, num_layers=num_layers,
                       roles=roles)

        if n_ref % stages:
            raise TopologyError(
                f"topology.reference_ranks={n_ref} is not a multiple of topology.pipeline_stages={stages}: "
                f"{n_ref} % {stages} = {n_ref % stages}; every reference replica needs all {stages} stages "
                f"(use reference_ranks = {stages} x replicas, e.g. {stages * max(1, n_ref // stages)})")
        if n_ref >= world_size:
            raise TopologyError(
                f"topology.reference_ranks={n_ref} leaves no policy ranks in a world of {world_size}: "
                f"world_size - reference_ranks = {world_size} - {n_ref} = {world_size - n_ref}; "
                f"at least one rank must train the policy (launch more processes or lower reference_ranks)")
        if num_layers is not None and stages > num_layers:
            raise TopologyError(
                f"topology.pipeline_stages={stages} > num_layers={num_layers}: each pipeline stage "
                f"needs at least one layer, so at most {num_layers} stages")
        replicas = n_ref // stages
        num_policy = world_size - n_ref

        # reference rank j in (replica, stage) order -> global rank
        if placement == "last":
            ref_globals = [num_policy + j for j in range(n_ref)]
        else:
            ref_globals = cls._interleave(world_size, n_ref, ranks_per_node)

        ref_set = set(ref_globals)
        policy_globals = [g for g in range(world_size) if g not in ref_set]
        assert len(policy_globals) == num_policy and policy_globals[0] == 0
        roles: list[Role | None] = [None] * world_size
        for i, g in enumerate(policy_globals):
            roles[g] = Role(kind="policy", global_rank=g, role_rank=i, role_world_size=num_policy,
                            index=i, num_policy=num_policy)
        for j, g in enumerate(ref_globals):
            replica, stage = divmod(j, stages)
            roles[g] = Role(kind="reference", global_rank=g, role_rank=stage * replicas + replica,
                            role_world_size=n_ref, stage=stage, replica=replica, num_stages=stages,
                            num_replicas=replicas)
        assert all(r is not None for r in roles)
        return cls(world_size=world_size, num_policy=num_policy, num_stages=stages, num_replicas=replicas,
                   placement=placement, ranks_per_node=ranks_per_node, num_layers=num_layers,
                   roles=tuple(roles))  # type: ignore[arg-type]

    @staticmethod
    def _interleave(world_size: int, n_ref: int, ranks_per_node: int | None) -> list[int]:
        if world_size % n_ref:
            fits = [d for d in _divisors(world_size) if d < world_size]
            raise TopologyError(
                f"topology.placement='interleaved' puts one reference rank at the end of each block of "
                f"world_size / reference_ranks ranks, but world_size={world_size} is not a multiple of "
                f"reference_ranks={n_ref}: {world_size} % {n_ref} = {world_size % n_ref}, so the blocks "
                f"cannot be equal. Use reference_ranks in {fits} (and a multiple of pipeline_stages) "
                f"or placement='last'")
        block = world_size // n_ref
        ref_globals = [(j + 1) * block - 1 for j in range(n_ref)]
        if ranks_per_node is not None and block % ranks_per_node and ranks_per_node % block:
            nodes = world_size // ranks_per_node
            counts = [0] * nodes
            for g in ref_globals:
                counts[g // ranks_per_node] += 1
            per_node = ", ".join(f"node {n}: {c}" for n, c in enumerate(counts))
            raise TopologyError(
                f"topology.placement='interleaved' with ranks_per_node={ranks_per_node}: blocks of "
                f"world_size / reference_ranks = {world_size} / {n_ref} = {block} ranks do not line up "
                f"with nodes of {ranks_per_node} ranks ({block} % {ranks_per_node} = "
                f"{block % ranks_per_node} and {ranks_per_node} % {block} = {ranks_per_node % block}), "
                f"so nodes would hold unequal numbers of reference ranks ({per_node}). Choose "
                f"reference_ranks so that the block divides or is a multiple of ranks_per_node, "
                f"or placement='last'")
        return ref_globals

    @classmethod
    def from_launch(cls, cfg: "TopologyConfig | Any", launch: LaunchEnv, *,
                    num_layers: int | None = None) -> "Topology":
        """`build` for this launch's world, with its ranks per node when the nodes are uniform."""
        return cls.build(cfg, launch.world_size, ranks_per_node=launch.ranks_per_node,
                         num_layers=num_layers)

    # -- queries ---------------------------------------------------------------------------
    def role_of(self, global_rank: int) -> Role:
        if isinstance(global_rank, bool) or not isinstance(global_rank, int) \
                or not 0 <= global_rank < self.world_size:
            raise TopologyError(
                f"global rank {global_rank!r} is outside 0..world_size-1 = 0..{self.world_size - 1}")
        return self.roles[global_rank]

    def policy_ranks(self) -> list[int]:
        """Global ranks of the policy, in policy-index order."""
        return [r.global_rank for r in sorted((r for r in self.roles if r.is_policy), key=lambda r: r.index)]

    def reference_ranks(self) -> list[int]:
        """Global ranks of the reference, ordered by (replica, stage)."""
        refs = [r for r in self.roles if r.is_reference]
        return [r.global_rank for r in sorted(refs, key=lambda r: (r.replica, r.stage))]

    def _need_reference(self, what: str) -> None:
        if not self.live:
            raise TopologyError(f"{what}: there is no reference group (reference_ranks=0, cache mode)")

    def stage_ranks(self, replica: int) -> list[int]:
        """Global ranks of one replica's stages, stage 0 first."""
        self._need_reference(f"stage_ranks({replica})")
        if not 0 <= replica < self.num_replicas:
            raise TopologyError(f"replica={replica} is outside 0..num_replicas-1 = 0..{self.num_replicas - 1}")
        refs = [r for r in self.roles if r.is_reference and r.replica == replica]
        return [r.global_rank for r in sorted(refs, key=lambda r: r.stage)]

    def reference_for_policy(self, policy_index: int) -> int:
        """The replica serving policy rank ``policy_index``: round-robin, policy_index % num_replicas.
        Replicas serve floor or ceil(num_policy / num_replicas) policy ranks each."""
        self._need_reference(f"reference_for_policy({policy_index})")
        if not 0 <= policy_index < self.num_policy:
            raise TopologyError(
                f"policy_index={policy_index} is outside 0..num_policy-1 = 0..{self.num_policy - 1}")
        return policy_index % self.num_replicas

    def policies_for_replica(self, replica: int) -> list[int]:
        """Policy indices served by ``replica`` (inverse of `reference_for_policy`)."""
        self._need_reference(f"policies_for_replica({replica})")
        if not 0 <= replica < self.num_replicas:
            raise TopologyError(f"replica={replica} is outside 0..num_replicas-1 = 0..{self.num_replicas - 1}")
        return list(range(replica, self.num_policy, self.num_replicas))

    def node_of(self, global_rank: int, launch: LaunchEnv | None = None) -> int | None:
        """Node index of a global rank (block placement), or None when it cannot be known."""
        if self.ranks_per_node:
            return global_rank // self.ranks_per_node
        if launch is not None:
            return launch.node_of(global_rank)
        return None

    # -- logs ------------------------------------------------------------------------------
    def describe(self, launch: LaunchEnv | None = None) -> str:
        """A readable rank -> role table, for logs."""
        if self.live:
            head = (f"topology: world_size={self.world_size} = {self.num_policy} policy + "
                    f"{self.num_reference} reference ({self.num_replicas} replica(s) x "
                    f"{self.num_stages} stage(s)), placement={self.placement}")
        else:
            head = f"topology: world_size={self.world_size}, all policy (no reference group: cache mode)"
        if self.ranks_per_node:
            head += f", ranks_per_node={self.ranks_per_node}"
        rows = [("rank", "node", "role", "role_rank", "stage", "replica", "link")]
        for r in self.roles:
            node = self.node_of(r.global_rank, launch)
            node_s = "?" if node is None else str(node)
            if r.is_policy:
                link = f"-> replica {self.reference_for_policy(r.index)}" if self.live else ""
                rows.append((str(r.global_rank), node_s, "policy", f"{r.role_rank}/{r.role_world_size}",
                             "-", "-", link))
            else:
                parts = []
                if r.is_first_stage:
                    parts.append("first stage")
                if r.is_last_stage:
                    parts.append("last stage")
                if r.stage == 0:
                    served = self.policies_for_replica(r.replica)
                    parts.append("serves policy " + ",".join(map(str, served)))
                rows.append((str(r.global_rank), node_s, "reference", f"{r.role_rank}/{r.role_world_size}",
                             f"{r.stage}/{r.num_stages}", f"{r.replica}/{r.num_replicas}", "; ".join(parts)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)

