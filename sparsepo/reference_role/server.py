"""The reference server (live mode): a pipeline-parallel frozen reference that walks the
policy's schedule ahead of it and sends each result to its consumer over the bridge.

Every reference process runs `serve`. All replicas move in lockstep rounds (the pipeline's
eval_batch synchronises the reference world), replica r serving policy ranks r, r+R, ... . At the
end the last stages write what they scored through to the reference cache, so a later run in
cache mode (or a restart) reuses it instead of rescoring.

SPO: nothing is walked ahead; each policy micro-step sends its samples and KL support ids as a
REQUEST (to the serving replica's first and last stage), the pipeline scores them (``score`` with
``request_ids``) and the last stage answers with OUTPUTS, in the schedule's rounds.

SePO: the group holds the oracle pair instead of the reference (two pipelines over the same stage
ranks, `sparsepo.reference_role.oracle_live`), after the same oracle check as cache and inline modes
(`oracle_manifest`: tokenizer and vocabulary, before any model is loaded); it writes r_t through to
the cache and sends each batch's key tokens (`sepo_selection`), bit-packed (the policy logs the
bytes per pair it received: `LiveSource.finish`).

FPO: the pipeline carries decoder layer `sae.layer`'s output to the last stage, which alone loads
the SAE (`sparsepo.sae.runtime.load_for_run`, checked against the reference model like every mode)
and serves the pooled top-k feature ids/values; the cache key includes the SAE fingerprint, layer
and k exactly as cache mode's does.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from sparsepo import bridge as br
from sparsepo import data as pdata
from sparsepo.config import config_fingerprint
from sparsepo.data.filters import pair_filter_for
from sparsepo.engine.collectives import gather, on_one_rank
from sparsepo.losses import get_method
from sparsepo.padding import batch_length
from sparsepo.reference_role import offline
from sparsepo.reference_role.follow_live import eval_syncs, eval_version, last_eval_moves, open_group_follower
from sparsepo.rundata import load_run_tokenizer, model_fingerprint, with_eval_pairs
from sparsepo.reference.cache import INDEX, write_index, write_shard
from sparsepo.reference_role.scorers import scorer_for
from sparsepo.schedule import Schedule

log = logging.getLogger("sparsepo")


class LiveModeError(ValueError):
    """A method or topology that live mode cannot serve."""


def live_fields(cfg) -> tuple[str, ...]:
    """What the pipeline reference group can serve for this run: the logit outputs, plus the SAE
    feature top-k when an SAE is configured (sae.path), plus SePO's oracle scores (sent as the
    selection) when an oracle pair is (reference.oracle)."""
    from sparsepo.reference.oracle import ORACLE_FIELDS
    from sparsepo.reference.scoring import FEATURE_FIELDS, SCORE_FIELDS

    return SCORE_FIELDS + (FEATURE_FIELDS if cfg.sae.path else ()) + (ORACLE_FIELDS if cfg.reference.oracle else ())


def live_outputs(cfg) -> tuple[str, ...]:
    from sparsepo.reference.scoring import FEATURE_FIELDS

    outputs = get_method(cfg.method.name, cfg.method.params).reference_outputs
    served = live_fields(cfg)
    unsupported = [o for o in outputs if o not in served]
    if unsupported:
        hint = (" (the SAE features need sae.path)" if any(o in FEATURE_FIELDS for o in unsupported) else "")
        raise LiveModeError(f"method '{cfg.method.name}' needs {unsupported} from the reference; the pipeline "
                            f"reference group serves {served}{hint}. Use reference.mode=cache or reference.mode=inline "
                            f"for it.")
    return outputs


def live_model_paths(cfg) -> list[str]:
    """The models the group will hold: the reference, or SePO's oracle pair — read from oracle.json
    and checked against the policy's tokenizer and vocabulary (`oracle_manifest`, the check every
    mode runs) before anything is loaded or scored."""
    return scorer_for(cfg, live_outputs(cfg)).model_paths()


def uses_features(outputs: tuple[str, ...]) -> bool:
    from sparsepo.reference.scoring import FEATURE_FIELDS

    return any(o in FEATURE_FIELDS for o in outputs)


def cache_components(cfg, scorer, data_fingerprint: str, outputs: tuple[str, ...]) -> dict:
    """The cache key of this run, computed by the last stage of replica 0 (the rank holding the SAE,
    whose fingerprint is part of the key) and shared over the reference world, so that every
    reference rank keys the cache identically: `offline.local_components` with the same
    `features` object as cache mode."""
    features = scorer.features if uses_features(outputs) else None
    return on_one_rank(lambda: offline.local_components(cfg, data_fingerprint, outputs, features),
                       src=scorer.last_stage_global_ranks()[0])


def check_live_topology(topology) -> None:
    if topology.num_policy % topology.num_replicas:
        raise LiveModeError(
            f"live mode needs the policy ranks to split evenly over the reference replicas: "
            f"{topology.num_policy} policy ranks % {topology.num_replicas} replicas = "
            f"{topology.num_policy % topology.num_replicas}. Change topology.reference_ranks or the world size.")


def rounds(schedule: Schedule, topo, start: int, total: int):
    """The server's walk: lockstep rounds across the replicas (replica r serves the policy ranks
    `topo.policies_for_replica(r)`). Each policy rank receives its slots in its own order."""
    return schedule.rounds(start, total, [topo.policies_for_replica(r) for r in range(topo.num_replicas)])


def check_handshake(hs, cfg, outputs: tuple[str, ...]) -> None:
    if not isinstance(hs, br.Handshake):
        raise LiveModeError(f"the policy opened the bridge with {hs!r}, not a handshake")
    if tuple(hs.outputs) != tuple(outputs) or hs.config_fingerprint != config_fingerprint(cfg):
        raise LiveModeError(f"the policy and the reference group disagree on the run: the policy needs {hs.outputs} "
                            f"(config {hs.config_fingerprint[:12]}), the group serves {outputs} (config "
                            f"{config_fingerprint(cfg)[:12]}); every rank must start from the same config")


def build_pipelines(cfg, choice, num_stages: int, fields: tuple[str, ...], features: bool):
    """The group's pipelines for the run's scorer (`scorers.scorer_for`). FPO: the last stages alone
    load the SAE, checked against the reference weights' fingerprint."""
    model_fp = model_fingerprint(cfg) if features else None

    def load_features():  # called on the last stages only: the others never load the SAE
        from sparsepo.sae.runtime import load_for_run

        return load_for_run(cfg, model_fingerprint=model_fp)

    return choice.pipelines(num_stages=num_stages, topk=cfg.reference.topk if "topk_ids" in fields else None,
                            feature_layer=cfg.sae.layer if features else None,
                            load_features=load_features if features else None)


def serve(cfg, plan, bridge) -> None:
    """Run one reference process until the policy's last step has been served."""
    topo, role = plan.topology, plan.role
    outputs = live_outputs(cfg)
    check_live_topology(topo)
    # The policy resolves resume and total steps (and fills the datasets cache) first.
    hs = br.broadcast(bridge, None, src=topo.policy_ranks()[0])
    check_handshake(hs, cfg, outputs)
    tokenizer = load_run_tokenizer(cfg)  # the policy's rule: both roles must tokenise the pairs alike
    dataset, _ = pdata.load_preference_dataset(cfg.data, tokenizer, pair_filter=pair_filter_for(cfg))
    dataset, held = with_eval_pairs(cfg, tokenizer, dataset)  # eval.fraction: the policy's training split
    features = uses_features(outputs)
    samples = get_method(cfg.method.name).needs_policy_samples
    sample_outputs = sample_fields(cfg) if samples else ()
    choice = scorer_for(cfg, outputs, samples=samples)  # SePO: the oracle pair, checked before loading
    scorer = build_pipelines(cfg, choice, topo.num_stages, outputs + sample_outputs, features)
    if scorer.replica_index != role.replica or scorer.stage_id != role.stage:
        raise RuntimeError(f"pipeline placed global rank {role.global_rank} at stage {scorer.stage_id} replica "
                           f"{scorer.replica_index}, topology says stage {role.stage} replica {role.replica}")
    schedule = Schedule.from_config(cfg, num_rows=len(dataset), dp=topo.num_policy)
    expected = cache_components(cfg, scorer, pdata.dataset_fingerprint(dataset), outputs)
    # TR-DPO: a moving reference is never read from, nor written through to, the cache
    follower = None if cfg.reference.sync_alpha is None else open_group_follower(
        cfg, bridge=bridge, scorer=scorer, topo=topo, role=role, start=hs.start_step)
    cache = (offline.open_cache(offline.cache_dir(cfg), expected, progress=cfg.logging.progress)
             if follower is None and (offline.cache_dir(cfg) / INDEX).is_file() else None)
    if role.is_last_stage and role.replica == 0:
        log.info("reference group: %d stage(s) x %d replica(s) serving %d policy ranks, steps %d..%d, window %d%s%s",
                 topo.num_stages, topo.num_replicas, topo.num_policy, hs.start_step, hs.total_steps,
                 cfg.reference.window,
                 f", SAE features of layer {cfg.sae.layer} (top {scorer.features.k})" if features else "",
                 ", from the existing cache" if cache else "")
    if samples:
        _serve_samples(cfg, bridge, topo, role, scorer, schedule, hs, sample_outputs, follower)
        br.broadcast(bridge, br.Finish(pairs_scored=0, cache_indexed=False), src=topo.reference_ranks()[0])
        return
    if held is not None:
        def write_eval(version: str | None = None) -> None:
            write_eval_cache(offline.eval_cache_cfg(cfg, version), held, scorer, outputs, role,
                             tokenizer.pad_token_id, batch_length(cfg))

        if follower is None:
            write_eval()
        else:  # TR-DPO: an eval cache for each reference the policy evaluates with
            follow_evals(cfg, follower, write_eval, hs.start_step, hs.total_steps)
    walk = _PairRounds(cfg, bridge, dataset=dataset, tokenizer=tokenizer, scorer=scorer, choice=choice, topo=topo,
                       role=role, cache=cache, follower=follower)
    for round_slots in rounds(schedule, topo, hs.start_step, hs.total_steps):
        walk.serve(round_slots)
    walk.outbox.flush()
    if follower is not None and last_eval_moves(cfg, hs.start_step, hs.total_steps):  # the policy's own rule
        follower.receive(hs.total_steps)  # the last step's reference, for the last evaluation
    indexed = follower is None and _write_through(cfg, expected, len(dataset), walk.scored if cache is None else {},
                                                  role)
    br.broadcast(bridge, br.Finish(pairs_scored=len(walk.seen), cache_indexed=bool(indexed or cache)),
                 src=topo.reference_ranks()[0])


class _PairRounds:
    """The walk over pair batches (every method but SPO): each round's batch is scored, or reused (the
    cache; an earlier epoch's records, kept by the last stages), and the last stage sends it to the
    policy rank it belongs to. TR-DPO (`follower`): the moved reference arrives before the first round
    of a step after a sync, and nothing is reused."""

    def __init__(self, cfg, bridge, *, dataset, tokenizer, scorer, choice, topo, role, cache, follower):
        self.dataset, self.tokenizer, self.scorer, self.choice = dataset, tokenizer, scorer, choice
        self.role, self.cache, self.follower = role, cache, follower
        self.policy_ranks = topo.policy_ranks()
        self.length = batch_length(cfg)  # the policy's own padding (sparsepo.padding)
        self.outbox = br.Outbox(bridge, cfg.reference.window)
        self.scored: dict[str, dict] = {}  # last stages: every record scored so far (a second epoch reuses them)
        self.seen: set[int] = set()  # rows scored by any replica: the same on every reference rank

    def serve(self, round_slots) -> None:
        role, slot = self.role, round_slots[self.role.replica]
        if self.follower is not None and self.follower.due(slot.step):
            self.follower.receive(slot.step)
        rows = [i for s in round_slots for i in s.rows]
        reuse = self.follower is None and (self.cache is not None or all(i in self.seen for i in rows))
        self.seen.update(rows)
        batch = None
        if role.is_last_stage or (self.scorer.needs_batch and not reuse):
            batch = pdata.collate_pairs(pdata.gather_rows(self.dataset, list(slot.rows)),
                                        self.tokenizer.pad_token_id, length=self.length)
        if reuse:
            records = (self.cache.get(batch.example_ids) if self.cache is not None
                       else [self.scored[i] for i in batch.example_ids]) if role.is_last_stage else None
        else:
            out = self.scorer.score(batch)
            records = out.to_records(batch.response_mask) if role.is_last_stage else None
        if role.is_last_stage:
            self.outbox.send(self.policy_ranks[slot.policy_rank], br.OUTPUTS, list(batch.example_ids),
                             self.choice.wire(batch, records, self.tokenizer.eos_token_id))
            if self.follower is None:
                self.scored.update(zip(batch.example_ids, records))


def follow_evals(cfg, follower, write_eval, start: int, total: int) -> None:
    """TR-DPO: the eval cache of every reference the policy evaluates with (`follow_live.eval_syncs`),
    written as soon as the group holds it: now for the starting one, else after the sync that makes it."""
    wanted = eval_syncs(cfg, start, total)

    def on_sync(step: int) -> None:
        if step // cfg.reference.sync_steps in wanted:
            write_eval(eval_version(cfg, step))

    follower.on_sync = on_sync
    on_sync(start)


def write_eval_cache(eval_cfg, held, scorer, outputs: tuple[str, ...], role, pad_id: int, length) -> None:
    """Live evaluation: score the held-out pairs once into the eval cache `eval_cfg` names
    (`offline.eval_cache_cfg`: before the first training round; TR-DPO: after each sync the policy
    evaluates with), which the policy waits for (`sources.open_eval_source`), keyed as cache mode keys
    it. Every replica runs the same batches (the pipelines move in lockstep); replica 0's last stage
    writes the shard and the index (last). An existing eval cache is left to the policy's check."""
    directory = offline.cache_dir(eval_cfg)
    expected = cache_components(eval_cfg, scorer, pdata.dataset_fingerprint(held), outputs)
    if (directory / INDEX).is_file():
        return
    records, ids, size = [], [], eval_cfg.eval.batch_size
    for start in range(0, len(held), size):
        batch = pdata.collate_pairs(pdata.gather_rows(held, list(range(start, min(start + size, len(held))))),
                                    pad_id, length=length)
        out = scorer.score(batch)
        if role.is_last_stage:
            records += out.to_records(batch.response_mask)
            ids += list(batch.example_ids)
    if role.is_last_stage and role.replica == 0:
        write_index(directory, expected, [write_shard(directory, 0, ids, records)])
        log.info("reference group: %d eval pairs scored into %s", len(ids), directory)


def sample_fields(cfg) -> tuple[str, ...]:
    """What SPO's policy asks about its samples (`policy_samples.PolicySamples` sends these names)."""
    union = getattr(cfg.method.params, "kl_support", "policy") == "union"
    return ("token_logps", "request_logps") + (("topk_ids", "topk_logps") if union else ())


class _SampleRequest:
    """A REQUEST's payload as the pipeline reads a batch (the sample mask is the response mask)."""

    def __init__(self, msg):
        body = msg.records[0]
        self.example_ids = msg.example_ids
        self.input_ids, self.attention_mask = body["input_ids"], body["attention_mask"]
        self.response_mask, self.request_ids = body["sample_mask"], body["request_ids"]


def _serve_samples(cfg, bridge, topo, role, scorer, schedule, hs, outputs, follower=None) -> None:
    """SPO: one REQUEST per policy micro-step (samples + support ids), in the schedule's rounds; the
    first and last stage of the serving replica receive it, the last stage returns OUTPUTS.
    TR-DPO (`follower`): a REQUEST of step k is scored by the reference after the syncs ≤ k, as inline
    mode scores it when it is made; where this rank hears the first policy rank's REQUESTs, the moved
    weights come through the same inbox, in the order that rank sent them."""
    policy_ranks = topo.policy_ranks()
    outbox = br.Outbox(bridge, cfg.reference.window) if role.is_last_stage else None
    inboxes: dict[int, br.Inbox] = {}

    def inbox_of(src: int) -> br.Inbox:
        if src not in inboxes:
            inboxes[src] = br.Inbox(bridge, src=src, window=cfg.reference.window)
        return inboxes[src]

    if follower is not None and scorer.needs_batch and 0 in topo.policies_for_replica(role.replica):
        first = inbox_of(policy_ranks[0])
        follower.recv = lambda: first.get(cfg.reference.timeout_s)
    for round_slots in rounds(schedule, topo, hs.start_step, hs.total_steps):
        slot = round_slots[role.replica]
        if follower is not None and follower.due(slot.step):
            follower.receive(slot.step)
        src = policy_ranks[slot.policy_rank]
        request = None
        if scorer.needs_batch:
            msg = inbox_of(src).get(cfg.reference.timeout_s)
            if msg.kind != br.REQUEST:
                raise br.BridgeError(f"policy rank {src} sent {br.KINDS.get(msg.kind)} #{msg.seq}, not a request")
            request = _SampleRequest(msg)
        got = scorer.score_samples(request, outputs)
        if role.is_last_stage:
            outbox.send(src, br.OUTPUTS, list(request.example_ids), [got])
    if outbox is not None:
        outbox.flush()


def _write_through(cfg, components: dict, num_pairs: int, scored: dict[str, dict], role) -> bool:
    """Last stages store what they scored; reference-world rank 0 indexes it (unless a cache exists).
    Returns, on rank 0, whether the cache was indexed."""
    directory = offline.cache_dir(cfg)
    exists = (directory / INDEX).is_file()
    entries = []
    if role.is_last_stage and scored and not exists:
        ids = list(scored)
        entries.append(write_shard(directory, 10_000 + role.replica, ids, [scored[i] for i in ids]))
    gathered = gather(entries)
    if dist.get_rank() != 0 or exists:
        return False
    shards = [e for part in gathered for e in part]
    if sum(len(s["example_ids"]) for s in shards) != num_pairs:
        log.info("reference group scored part of the data only: no cache index written")
        return False
    write_index(directory, components, shards)
    log.info("reference group wrote its %d scored pairs through to the cache %s", num_pairs, directory)
    return True
