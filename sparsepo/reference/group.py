"""The reference group's main loop (live mode): a pipeline-parallel frozen reference that walks the
policy's schedule ahead of it and sends each result to its consumer over the bridge.

Every reference process runs `serve`. All replicas move in lockstep rounds (the pipeline's
eval_batch synchronises the reference world), replica r serving policy ranks r, r+R, ... . At the
end the last stages write what they scored through to the reference cache, so a later run in
cache mode (or a restart) reuses it instead of rescoring.

FPO: the pipeline carries decoder layer `sae.layer`'s output to the last stage, which alone loads
the SAE (`sparsepo.fpo.load_for_run`) and serves the pooled top-k feature ids/values; the cache
key includes the SAE fingerprint, layer and k exactly as cache mode's does.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from sparsepo import data as pdata
from sparsepo.losses import get_method
from sparsepo.models import load_tokenizer
from sparsepo.reference import offline
from sparsepo.reference.cache import INDEX, CacheReader, write_index, write_shard
from sparsepo.reference.scorer import required_outputs
from sparsepo.scheduler import Sender, broadcast_int, rows_for

log = logging.getLogger("sparsepo")


class LiveModeError(ValueError):
    """A method or topology that live mode cannot serve."""


def live_fields(cfg) -> tuple[str, ...]:
    """What the pipeline reference group can serve for this run: the logit outputs, plus the SAE
    feature top-k when an SAE is configured (sae.path)."""
    from sparsepo.reference.scoring import FEATURE_FIELDS, SCORE_FIELDS

    return SCORE_FIELDS + (FEATURE_FIELDS if cfg.sae.path else ())


def live_outputs(cfg) -> tuple[str, ...]:
    from sparsepo.reference.scoring import FEATURE_FIELDS

    outputs = required_outputs(get_method(cfg.method.name))
    served = live_fields(cfg)
    unsupported = [o for o in outputs if o not in served]
    if unsupported:
        hint = (" (the SAE features need sae.path)" if any(o in FEATURE_FIELDS for o in unsupported) else "")
        raise LiveModeError(f"method '{cfg.method.name}' needs {unsupported} from the reference; the pipeline "
                            f"reference group serves {served}{hint}. Use reference.mode=cache for it.")
    return outputs


def uses_features(outputs: tuple[str, ...]) -> bool:
    from sparsepo.reference.scoring import FEATURE_FIELDS

    return any(o in FEATURE_FIELDS for o in outputs)


def cache_components(cfg, scorer, data_fingerprint: str, outputs: tuple[str, ...]) -> dict:
    """The cache key of this run, computed by the last stage of replica 0 (the rank holding the SAE,
    whose fingerprint is part of the key) and broadcast over the reference world, so that every
    reference rank keys the cache identically: `offline.local_components` with the same
    `features` object as cache mode."""
    src = scorer.last_stage_global_ranks()[0]
    box = [None]
    if dist.get_rank() == src:
        features = scorer.features if uses_features(outputs) else None
        box[0] = offline.local_components(cfg, data_fingerprint, outputs, features)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def check_live_topology(topology) -> None:
    if topology.num_policy % topology.num_replicas:
        raise LiveModeError(
            f"live mode needs the policy ranks to split evenly over the reference replicas: "
            f"{topology.num_policy} policy ranks % {topology.num_replicas} replicas = "
            f"{topology.num_policy % topology.num_replicas}. Change topology.reference_ranks or the world size.")


def serve(cfg, plan, bridge) -> None:
    """Run one reference process until the policy's last step has been served."""
    from sparsepo.engine.pipeline import PipelineScorer

    topo, role = plan.topology, plan.role
    outputs = live_outputs(cfg)
    check_live_topology(topo)
    # The policy resolves resume and total steps (and fills the datasets cache) first.
    start, total = broadcast_int(bridge, 0), broadcast_int(bridge, 0)
    ref_path = offline.reference_path(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or ref_path)
    dataset, _ = pdata.load_preference_dataset(cfg.data, tokenizer)
    features = uses_features(outputs)

    def load_features():  # called on the last stages only: the others never load the SAE
        from sparsepo import fpo

        return fpo.load_for_run(cfg)

    scorer = PipelineScorer.from_pretrained(
        ref_path, num_stages=topo.num_stages, precision=cfg.train.precision, outputs=outputs,
        topk=cfg.reference.topk if "topk_ids" in outputs else None,
        feature_layer=cfg.sae.layer if features else None, features=load_features if features else None)
    if scorer.replica_index != role.replica or scorer.stage_id != role.stage:
        raise RuntimeError(f"pipeline placed global rank {role.global_rank} at stage {scorer.stage_id} replica "
                           f"{scorer.replica_index}, topology says stage {role.stage} replica {role.replica}")
    policy_ranks = topo.policy_ranks()
    mine = topo.policies_for_replica(role.replica)
    sender = Sender(bridge, cfg.reference.window)
    dp, n, replicas = topo.num_policy, len(dataset), topo.num_replicas
    expected = cache_components(cfg, scorer, pdata.dataset_fingerprint(dataset), outputs)
    cache = CacheReader(offline.cache_dir(cfg), expected) if (offline.cache_dir(cfg) / INDEX).is_file() else None
    scored: dict[str, dict] = {}  # last stages: every record scored so far (a second epoch reuses them)
    seen: set[int] = set()  # rows scored by any replica: the same on every reference rank
    if role.is_last_stage and role.replica == 0:
        log.info("reference group: %d stage(s) x %d replica(s) serving %d policy ranks, steps %d..%d, window %d%s%s",
                 topo.num_stages, replicas, dp, start, total, cfg.reference.window,
                 f", SAE features of layer {cfg.sae.layer} (top {scorer.features.k})" if features else "",
                 ", from the existing cache" if cache else "")
    for step in range(start, total):
        for micro in range(cfg.train.grad_accum):
            for j, p in enumerate(mine):
                # one lockstep round: replica r serves policy rank policies_for_replica(r)[j]
                round_rows = [rows_for(cfg, n, dp, step, micro, topo.policies_for_replica(r)[j])
                              for r in range(replicas)]
                reuse = cache is not None or all(i in seen for rows in round_rows for i in rows)
                seen.update(i for rows in round_rows for i in rows)
                rows = round_rows[role.replica]
                batch = None
                if role.is_last_stage or (scorer.needs_batch and not reuse):
                    batch = pdata.collate_pairs(pdata.gather_rows(dataset, rows), tokenizer.pad_token_id)
                if reuse:
                    records = (cache.get(batch.example_ids) if cache is not None
                               else [scored[i] for i in batch.example_ids]) if role.is_last_stage else None
                else:
                    out = scorer.score(batch)
                    records = out.to_records(batch.response_mask) if role.is_last_stage else None
                if role.is_last_stage:
                    sender.send(policy_ranks[p], list(batch.example_ids), records)
                    scored.update(zip(batch.example_ids, records))
    sender.flush()
    _write_through(cfg, expected, len(dataset), scored if cache is None else {}, role)
    bridge.barrier().wait()


def _write_through(cfg, components: dict, num_pairs: int, scored: dict[str, dict], role) -> None:
    """Last stages store what they scored; reference-world rank 0 indexes it (unless a cache exists)."""
    directory = offline.cache_dir(cfg)
    exists = (directory / INDEX).is_file()
    entries = []
    if role.is_last_stage and scored and not exists:
        ids = list(scored)
        entries.append(write_shard(directory, 10_000 + role.replica, ids, [scored[i] for i in ids]))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entries)
    if dist.get_rank() == 0 and not exists:
        shards = [e for part in gathered for e in part]
        if sum(len(s["example_ids"]) for s in shards) == num_pairs:
            write_index(directory, components, shards)
            log.info("reference group wrote its %d scored pairs through to the cache %s", num_pairs, directory)
        else:
            log.info("reference group scored part of the data only: no cache index written")
