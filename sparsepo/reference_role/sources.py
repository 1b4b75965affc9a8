"""Reference sources: where a policy rank's reference outputs come from, behind one interface.

    source = open_source(cfg, spec, ...)      # cache | inline | live (reference.mode), or none
    ref = source.get(batch)                   # ReferenceOutputs for exactly this batch, or None
    source.finish()                           # end of the run (live: the group's typed finish)

The trainer holds one source and never knows which. Every source hands back outputs for the
batch's own example ids, in its order, or raises `MisalignedOutputs`.
"""

from __future__ import annotations

import logging
import queue
from typing import Any, Protocol, runtime_checkable

import torch

from sparsepo import bridge as br
from sparsepo.reference.outputs import MisalignedOutputs, ReferenceOutputs

log = logging.getLogger("sparsepo")


class ReferenceSource(Protocol):
    """What the trainer holds (`open_source`): the reference outputs of each batch, whatever the mode."""

    outputs: tuple[str, ...]

    def get(self, batch) -> ReferenceOutputs | None:
        """Outputs for exactly this batch's example ids, in its order (None: the method needs none)."""

    def finish(self) -> Any:
        """The end of the run (live: the group's typed finish)."""


@runtime_checkable
class SampleSource(Protocol):
    """A source that also scores the policy's own samples on request (SPO: inline and live)."""

    def request(self, samples, request_ids, outputs: tuple[str, ...]) -> Any:
        """Send (or score at once) one sample round; returns the ticket `collect` redeems."""

    def collect(self, ticket) -> dict:
        """The reference's scores for a request, in request order."""


class ReferenceTimeout(RuntimeError):
    """The reference group sent nothing within reference.timeout_s, or its rank died."""


class NoReference:
    """Reference-free methods (SimPO, SePO's policy loss, ...): nothing to fetch."""

    outputs: tuple[str, ...] = ()

    def get(self, batch) -> None:
        return None

    def finish(self) -> None:
        pass


class CacheSource:
    """The verified on-disk reference cache (`sparsepo precompute`, or a live run's write-through)."""

    def __init__(self, reader, outputs: tuple[str, ...], device):
        self.reader, self.outputs, self.device = reader, outputs, device

    def get(self, batch) -> ReferenceOutputs:
        return ReferenceOutputs.from_records(batch.example_ids, self.reader.get(batch.example_ids),
                                             batch.response_mask, self.device)

    def finish(self) -> None:
        pass


class InlineSource:
    """The frozen reference (SePO: the oracle pair) on the policy rank itself, scored inside the step
    (TRL's way; the sequential baseline of the overlap benchmark)."""

    def __init__(self, head, outputs: tuple[str, ...], *, topk: int, features=None):
        """`head`: the frozen reference's `sparsepo.logprobs.head.Head` (its chunk bound when it was
        loaded), or SePO's oracle pair (`score_batch` takes either)."""
        self.head, self.outputs, self.topk, self.features = head, outputs, topk, features

    def get(self, batch) -> ReferenceOutputs | None:
        from sparsepo.reference.scorer import score_batch

        if not self.outputs:  # SPO: nothing on the pairs, only the samples (score_samples)
            return None
        return score_batch(self.head, batch, self.outputs, topk=self.topk, features=self.features)

    @property
    def model(self):
        """The frozen reference model behind the head (TR-DPO moves it; its checkpoints hold it)."""
        return self.head.model

    def follow(self, policy, alpha: float, step: int) -> None:
        """TR-DPO: move the frozen reference towards the policy after optimiser step `step`
        (`sparsepo.follow`; collective under ZeRO-3)."""
        policy.mix_into(self.model, alpha)

    def follow_state(self) -> dict:
        """TR-DPO: the moved reference, for this rank's checkpoint."""
        return self.model.state_dict()

    def load_follow_state(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def load_follow_states(self, load, world: int) -> None:
        """Another world size's checkpoint (`load(r)`: saved rank r's state): every rank saved the same
        whole reference, so rank 0's is read."""
        self.model.load_state_dict(load(0))

    def request(self, samples, request_ids, outputs: tuple[str, ...]) -> dict:
        """Inline: scored at once; the ticket is the result (see `LiveSource.request`)."""
        return self.score_samples(samples, request_ids, outputs)

    def collect(self, ticket: dict) -> dict:
        return ticket

    @torch.no_grad()
    def score_samples(self, samples, request_ids, outputs: tuple[str, ...]) -> dict:
        """The reference side of SPO's KL on the policy's samples (a `generation.SampleBatch`), by the
        one scoring function: `outputs` from token_logps, request_logps (at `request_ids` (S,T,K)),
        topk_ids / topk_logps (the reference's own top-K)."""
        from sparsepo.reference.scoring import score

        logits = self.head.forward(samples.input_ids, samples.attention_mask)
        return score(logits, samples.input_ids, samples.sample_mask, outputs, topk=self.topk, request_ids=request_ids)

    def finish(self) -> None:
        pass


class LiveSource:
    """The policy-side end of a live run: the reference group's results for this rank arrive over
    the bridge in schedule order (an `Inbox` holding at most W of them); `get` checks each one
    belongs to the batch — kind, sequence number and example ids — before handing it over."""

    def __init__(self, bridge, *, src: int, window: int, timeout_s: float, outputs: tuple[str, ...] = (),
                 device="cpu", finish_src: int | None = None, request_dsts: tuple[int, ...] = (),
                 serves_pairs: bool = True, stage: int | None = None, num_stages: int = 1, follower=None):
        """`request_dsts`: where SPO's REQUESTs go; `serves_pairs=False`: no OUTPUTS per pair batch
        (SPO's group only answers requests), so `get` returns None; `follower`: TR-DPO's
        (`follow_live.PolicyFollower`)."""
        self.follower = follower
        self.bridge, self.src, self.timeout_s, self.outputs, self.device = bridge, src, timeout_s, outputs, device
        # who it hears from: the last stage, which only relays what the earlier stages computed
        self.sender = f"reference rank {src}" + ("" if stage is None else f" (stage {stage} of {num_stages})")
        self.upstream = (f"; the failure may be upstream, in stages 0..{num_stages - 2} of its replica (the "
                         f"watchdog's 'lost' line names the rank)") if num_stages > 1 else ""
        self.finish_src = src if finish_src is None else finish_src
        self.inbox = br.Inbox(bridge, src=src, window=window)
        self.outbox = br.Outbox(bridge, window)
        self.request_dsts = tuple(dict.fromkeys(request_dsts))  # SPO: first and last stage of the replica
        self.serves_pairs = serves_pairs
        self.next_seq = 0
        self.last_served = "none yet"
        self.bytes_received = self.pairs_received = 0  # OUTPUTS for pair batches (SePO: the bit-packed selection)

    def follow(self, policy, alpha: float, step: int) -> None:
        """TR-DPO: the reference on the policy ranks moves, and the group receives it (`follow_live`)."""
        self.follower.follow(policy, alpha, step)

    def follow_state(self) -> dict:
        return self.follower.state_dict()

    def load_follow_state(self, state: dict) -> None:
        self.follower.load_state_dict(state)

    def load_follow_states(self, load, world: int) -> None:
        """Another world size's checkpoint: every saved rank's slices, re-cut for this one."""
        self.follower.load_resharded([load(r) for r in range(world)])

    def request(self, samples, request_ids, outputs: tuple[str, ...]) -> list[str]:
        """SPO: send the samples and the support ids to the replica's first and last stage (REQUEST);
        returns the ticket `collect` redeems (requests are answered in order)."""
        body = {"input_ids": samples.input_ids.cpu(), "attention_mask": samples.attention_mask.cpu(),
                "sample_mask": samples.sample_mask.cpu(), "request_ids": request_ids.cpu()}
        for dst in self.request_dsts:
            self.outbox.send(dst, br.REQUEST, list(samples.keys), [body])
        return list(samples.keys)

    def collect(self, ticket: list[str]) -> dict:
        """The reference's scores for a request (blocks until they arrive)."""
        msg = self._next(ticket)
        return {k: v.to(self.device) for k, v in msg.records[0].items()}

    def get(self, batch) -> ReferenceOutputs | None:
        if not self.serves_pairs:  # SPO: nothing on the pairs, only on request
            return None
        msg = self._next(list(batch.example_ids))
        self.bytes_received += msg.nbytes
        self.pairs_received += len(msg.example_ids)
        return ReferenceOutputs.from_records(batch.example_ids, msg.records, batch.response_mask, self.device)

    def _next(self, example_ids: list[str]):
        try:
            msg = self.inbox.get(self.timeout_s)
        except queue.Empty:
            raise ReferenceTimeout(
                f"no reference outputs from {self.sender} for {self.timeout_s:.0f}s "
                f"waiting for batch {self.next_seq}; last batch served: {self.last_served}. The reference "
                f"group is dead, hung or far slower than the policy (reference.timeout_s){self.upstream}") from None
        except Exception as e:  # noqa: BLE001 - the transport's error, with who and where
            raise ReferenceTimeout(f"bridge to {self.sender} failed waiting for batch "
                                   f"{self.next_seq} (last served: {self.last_served}): {e}{self.upstream}") from e
        if msg.kind != br.OUTPUTS or msg.seq != self.next_seq or msg.example_ids != example_ids:
            raise MisalignedOutputs(
                f"reference rank {self.src} sent {br.KINDS.get(msg.kind, msg.kind)} #{msg.seq} for examples "
                f"{msg.example_ids[:3]}... but the policy expects batch {self.next_seq} for "
                f"{example_ids[:3]}...: refusing to train on misaligned outputs (the two sides "
                f"disagree on the schedule or the data)")
        self.last_served = f"#{self.next_seq} ({msg.example_ids[0]}...)"
        self.next_seq += 1
        return msg

    def finish(self) -> br.Finish:
        """Wait for the group's typed finish (sent after its write-through to the cache)."""
        done = br.broadcast(self.bridge, None, src=self.finish_src)
        if not isinstance(done, br.Finish):
            raise MisalignedOutputs(f"reference group ended with {done!r}, not a Finish message")
        if self.pairs_received:
            log.info("bridge: reference outputs for %d pairs received, %d bytes (%.1f bytes/pair)",
                     self.pairs_received, self.bytes_received, self.bytes_received / self.pairs_received)
        return done


def open_source(cfg, spec, *, ctx, dataset, collate, data_fingerprint: str, features=None, live=None,
                handshake: br.Handshake | None = None, policy=None) -> ReferenceSource:
    """The source this run's mode asks for. Cache mode precomputes the cache first when it is
    missing; live mode sends the typed handshake (every bridge rank takes part). Inline mode with
    LoRA scores with `policy.reference_view()` (the policy, adapters off) when the reference is the
    base model."""
    from sparsepo.logprobs.head import Head, head_chunk
    from sparsepo.reference_role import offline
    from sparsepo.reference_role.scorers import ReferenceScorer, scorer_for

    outputs = spec.reference_outputs
    if live is not None:
        plan, bridge = live
        topo = plan.topology
        br.broadcast(bridge, handshake, src=topo.policy_ranks()[0])
        follower = None
        if cfg.reference.sync_alpha is not None:  # TR-DPO: before the Inbox, which would take the manifests
            from sparsepo.reference_role.follow_live import open_policy_follower

            follower = open_policy_follower(cfg, bridge=bridge, topo=topo, policy=policy, ctx=ctx,
                                            start=handshake.start_step, total=handshake.total_steps)
        stages = topo.stage_ranks(topo.reference_for_policy(ctx.rank))
        source = LiveSource(bridge, src=stages[-1], window=cfg.reference.window, timeout_s=cfg.reference.timeout_s,
                            outputs=outputs, device=ctx.device, finish_src=topo.reference_ranks()[0],
                            request_dsts=(stages[0], stages[-1]) if spec.needs_policy_samples else (),
                            serves_pairs=bool(outputs), stage=topo.num_stages - 1, num_stages=topo.num_stages,
                            follower=follower)
        return source
    if not outputs and not spec.needs_policy_samples:
        return NoReference()
    if cfg.reference.mode == "inline":
        scorer = scorer_for(cfg, outputs)
        view = policy.reference_view() if policy is not None and isinstance(scorer, ReferenceScorer) \
            and scorer.path == cfg.model.path else None
        if view is not None and ctx.is_main:
            log.info("inline reference: the policy with its LoRA adapters switched off (no second copy)")
        head = Head.for_model(view, head_chunk(cfg)) if view is not None else offline.load_scorer(cfg, outputs, ctx.device)
        return InlineSource(head, outputs, topk=cfg.reference.topk, features=features)
    reader = offline.ensure_cache(cfg, outputs, dataset, collate, data_fingerprint=data_fingerprint, ctx=ctx,
                                  features=features)
    return CacheSource(reader, outputs, ctx.device)


class FollowingEvalSource:
    """TR-DPO in live mode: the held-out pairs scored by the reference the run has moved to — at each
    evaluation, the eval cache the group wrote for it (`follow_live.eval_version`), waited for and kept."""

    def __init__(self, cfg, outputs: tuple[str, ...], follower, *, device, expected):
        self.cfg, self.outputs, self.follower, self.device, self.expected = cfg, outputs, follower, device, expected
        self.readers: dict[str, CacheSource] = {}

    def get(self, batch) -> ReferenceOutputs:
        from sparsepo.reference_role import offline
        from sparsepo.reference_role.follow_live import eval_version

        version = eval_version(self.cfg, self.follower.step)
        if version not in self.readers:
            eval_cfg = offline.eval_cache_cfg(self.cfg, version)
            reader = offline.wait_for_cache(offline.cache_dir(eval_cfg), self.expected(eval_cfg),
                                            timeout_s=self.cfg.reference.timeout_s, progress=self.cfg.logging.progress)
            self.readers = {version: CacheSource(reader, self.outputs, self.device)}  # one reference at a time
        return self.readers[version].get(batch)

    def finish(self) -> None:
        pass


def open_eval_source(cfg, spec, train_source, *, ctx, dataset, collate, data_fingerprint: str, features=None):
    """The reference outputs for the held-out pairs, from the training source's kind: the same object
    when it scores any batch (inline, none); in cache mode an eval cache beside the training one
    (`<cache dir>_eval`, keyed by the eval pairs' fingerprint, computed when missing); in live mode the
    same eval cache, written by the reference group before it serves the first step
    (`server.write_eval_cache`), waited for here."""
    from sparsepo.reference_role import offline

    if not isinstance(train_source, (CacheSource, LiveSource)):
        return train_source
    if isinstance(train_source, LiveSource) and train_source.follower is not None:
        return FollowingEvalSource(cfg, spec.reference_outputs, train_source.follower, device=ctx.device,
                                   expected=lambda eval_cfg: offline.components(eval_cfg, data_fingerprint,
                                                                                spec.reference_outputs, features))
    eval_cfg = offline.eval_cache_cfg(cfg)
    if isinstance(train_source, LiveSource):
        expected = offline.components(eval_cfg, data_fingerprint, spec.reference_outputs, features)
        reader = offline.wait_for_cache(offline.cache_dir(eval_cfg), expected, timeout_s=cfg.reference.timeout_s,
                                        progress=cfg.logging.progress)
    else:
        reader = offline.ensure_cache(eval_cfg, spec.reference_outputs, dataset, collate,
                                      data_fingerprint=data_fingerprint, ctx=ctx, features=features)
    return CacheSource(reader, spec.reference_outputs, ctx.device)
