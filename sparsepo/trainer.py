"""The training loop: one function, every method, fed by the loss table's flags.

    sparsepo train --config recipes/demo_dpo.yaml method.beta=0.05
    deepspeed --num_gpus 2 --module sparsepo.train --config recipes/demo_dpo.yaml

Per optimiser step and per micro-batch: collate the rows this rank owns -> reference outputs for
them (cache or live group) -> one policy forward of chosen + rejected -> the method's loss ->
engine backward/step. Metrics are averaged over ranks and written by rank 0.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from sparsepo import checkpoint as ckpt
from sparsepo import fpo
from sparsepo import data as pdata
from sparsepo import engine as eng
from sparsepo.config import RunConfig, build_deepspeed_config, check_batch_size, config_fingerprint, lr_schedule
from sparsepo.losses import LossInputs, get_method
from sparsepo.metrics import MetricsLogger, reduce_mean
from sparsepo.preemption import Preempted, PreemptionFlag
from sparsepo.models import load_tokenizer, logps_at, pair_forward
from sparsepo.reference import offline
from sparsepo.reference.outputs import MisalignedOutputs, ReferenceOutputs
from sparsepo.reference.scorer import required_outputs, score_batch
from sparsepo.rundir import RunDirError, prepare_run_dir, release_run_dir  # noqa: F401  (RunDirError: re-exported)
from sparsepo.scheduler import LiveReference, broadcast_int, rows_for

log = logging.getLogger("sparsepo")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_inputs(spec, fwd, batch, ref: ReferenceOutputs | None, policy_features=None) -> LossInputs:
    """Exactly what the method's table row asks for, split into chosen / rejected halves."""
    b = batch.num_pairs
    mask = batch.response_mask
    kw = dict(policy_chosen_logps=fwd.seq_logps[:b], policy_rejected_logps=fwd.seq_logps[b:],
              chosen_mask=mask[:b], rejected_mask=mask[b:])
    if policy_features is not None:
        kw.update(policy_chosen_features=policy_features[:b], policy_rejected_features=policy_features[b:])
    if spec.needs_token_logps:
        kw.update(policy_chosen_token_logps=fwd.token_logps[:b], policy_rejected_token_logps=fwd.token_logps[b:])
    if ref is not None:
        if ref.example_ids != list(batch.example_ids):
            raise MisalignedOutputs(f"reference outputs for {ref.example_ids[:3]}... delivered for batch "
                                    f"{list(batch.example_ids)[:3]}...")
        if spec.needs_reference:
            kw.update(ref_chosen_logps=ref.seq_logps[:b], ref_rejected_logps=ref.seq_logps[b:])
        if ref.topk_ids is not None:
            policy_topk = logps_at(fwd.logits, ref.topk_ids, mask)
            kw.update(ref_chosen_topk_logps=ref.topk_logps[:b], ref_rejected_topk_logps=ref.topk_logps[b:],
                      policy_chosen_topk_logps=policy_topk[:b], policy_rejected_topk_logps=policy_topk[b:])
        if ref.oracle_scores is not None:
            kw.update(chosen_oracle_scores=ref.oracle_scores[:b], rejected_oracle_scores=ref.oracle_scores[b:])
        if ref.feature_ids is not None:
            kw.update(ref_chosen_feature_ids=ref.feature_ids[:b], ref_rejected_feature_ids=ref.feature_ids[b:],
                      ref_chosen_feature_values=ref.feature_values[:b],
                      ref_rejected_feature_values=ref.feature_values[b:])
    return LossInputs(**kw)


def train(cfg: RunConfig, live=None, preempt: PreemptionFlag | None = None) -> dict:
    """Train the policy described by `cfg`; returns the final averaged metrics (rank 0 writes them).
    `live` = (ProcessPlan, bridge) when this process is a policy rank of a live job: reference
    outputs then arrive from the reference group through the scheduler instead of the cache."""
    ctx = eng.init_distributed()
    spec = get_method(cfg.method.name)
    dp = ctx.world_size
    global_batch = check_batch_size(cfg, dp)
    run_dir = prepare_run_dir(cfg, is_main=ctx.is_main)
    seed_everything(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    if not ctx.is_main:  # rank 0 tokenises and fills the datasets cache; the others then hit it
        dist.barrier()
    dataset, report = pdata.load_preference_dataset(cfg.data, tokenizer, run_dir=run_dir if ctx.is_main else None)
    if ctx.is_main:
        dist.barrier()
    data_fp = pdata.dataset_fingerprint(dataset)

    def collate(rows):
        return pdata.collate_pairs(rows, tokenizer.pad_token_id)

    precompute_only = cfg.reference.mode == "precompute"
    features = fpo.load_for_run(cfg) if spec.needs_sae_features else None
    inline = cfg.reference.mode == "inline"
    reader = None if live or inline else offline.ensure_cache(cfg, spec, dataset, collate, data_fingerprint=data_fp, rank=ctx.rank,
                                  world_size=ctx.world_size, device=ctx.device, features=features,
                                  force=precompute_only)
    if precompute_only:
        release_run_dir(run_dir)
        return {"cache": str(offline.cache_dir(cfg)), "pairs": len(dataset)}
    resume = ckpt.find_resume(cfg)

    per_epoch = pdata.steps_per_epoch(len(dataset), global_batch)
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} pairs cannot fill one global batch of {global_batch} "
                         f"(micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum} x {dp} ranks)")
    total = cfg.train.max_steps or per_epoch * cfg.train.epochs
    ds_config = build_deepspeed_config(cfg, dp_size=dp)
    if ctx.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    policy = eng.build_policy(cfg.model.path, ds_config, schedule=lr_schedule(cfg, total), precision=cfg.train.precision,
                              gradient_checkpointing=cfg.model.gradient_checkpointing)
    start = 0
    if resume is not None:
        start = ckpt.restore(policy, resume, cfg, data_fingerprint=data_fp, ctx=ctx)

    fetch = None  # batch -> ReferenceOutputs
    if reader is not None:
        fetch = lambda b: ReferenceOutputs.from_records(b.example_ids, reader.get(b.example_ids),  # noqa: E731
                                                        b.response_mask, ctx.device)
    if inline and required_outputs(spec):
        from sparsepo.models import load_frozen_model

        ref_model = load_frozen_model(offline.reference_path(cfg), device=ctx.device, precision=cfg.train.precision)
        fetch = lambda b: score_batch(ref_model, b, required_outputs(spec), topk=cfg.reference.topk,  # noqa: E731
                                      features=features)
    if live:
        plan, bridge = live
        broadcast_int(bridge, start)
        broadcast_int(bridge, total)
        src = plan.topology.stage_ranks(plan.topology.reference_for_policy(ctx.rank))[-1]
        stream = LiveReference(bridge, src=src, window=cfg.reference.window, timeout_s=cfg.reference.timeout_s)
        fetch = lambda b: stream.get(b, ctx.device)  # noqa: E731
    metrics = MetricsLogger(run_dir, total_steps=total, start_step=start, enabled=ctx.is_main,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                            log_every=cfg.logging.log_every)
    if ctx.is_main:
        log.info("training %s on %d pairs: %d steps of %d pairs over %d rank(s)", spec.name, len(dataset), total,
                 global_batch, dp)
    params = cfg.method.params
    preempt = preempt or PreemptionFlag()
    last: dict[str, float] = {}
    for step in range(start, total):
        t_step, wait, tokens, sums = time.perf_counter(), 0.0, 0, {}
        lr = float(policy.get_lr()[0])  # the rate this step uses
        for micro in range(cfg.train.grad_accum):
            rows = rows_for(cfg, len(dataset), dp, step, micro, ctx.rank)
            batch = collate(pdata.gather_rows(dataset, rows)).to(ctx.device)
            t_ref = time.perf_counter()
            ref = fetch(batch) if fetch is not None else None
            wait += time.perf_counter() - t_ref
            with features.capture(policy) if features is not None else nullcontext() as cap:
                fwd = pair_forward(policy, batch)
            pooled, feature_metrics = features.policy(cap, batch) if features is not None else (None, {})
            out = spec.loss_fn(loss_inputs(spec, fwd, batch, ref, pooled), params)
            loss = out.losses.mean()
            policy.backward(loss)
            policy.step()
            tokens += int(batch.attention_mask.sum())
            for k, v in {"loss": loss.detach(), **out.metrics, **feature_metrics,
                         "rewards_chosen": out.chosen_rewards.mean(),
                         "rewards_rejected": out.rejected_rewards.mean()}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.train.grad_accum
        step_time = time.perf_counter() - t_step
        grad_norm = policy.get_global_grad_norm()
        scalars = reduce_mean({**sums, "step_time": step_time, "ref_wait": wait,
                               "tokens_per_s": tokens * dp / step_time})
        scalars.update(lr=lr, grad_norm=float(grad_norm or 0.0))
        metrics.log(step + 1, scalars)
        last = scalars
        stop = preempt.any_rank()
        if stop or ckpt.due(cfg, step + 1, total):
            ckpt.save(policy, cfg, run_dir, step=step + 1, samples=(step + 1) * global_batch,
                      data_fingerprint=data_fp, ctx=ctx)
        if stop:
            metrics.close()
            raise Preempted(f"preempted at step {step + 1}: checkpoint written; resume with --resume auto")
    metrics.close()
    if live:
        live[1].barrier().wait()  # the reference group finishes its write-through before anyone leaves
    eng.save_hf_model(policy, tokenizer, run_dir / "final", is_main=ctx.is_main)
    shards: list = [None] * ctx.world_size
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    dist.all_gather_object(shards, (*eng.local_parameter_count(policy), peak_rss_mib))
    summary = {"method": spec.name, "steps": total, "final": last, "config_fingerprint": config_fingerprint(cfg),
               "world_size": ctx.world_size, "parameters_per_rank": [s[0] for s in shards],
               "parameters_total": shards[0][1], "peak_rss_mib_per_rank": [round(s[2], 1) for s in shards],
               "data": asdict(report) if hasattr(report, "__dataclass_fields__") else str(report)}
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        log.info("done: final model in %s", run_dir / "final")
    release_run_dir(run_dir)
    return summary
