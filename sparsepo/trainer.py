"""The training loop: `setup` builds a `Run`; `train` walks the schedule, every method alike.

    sparsepo train --config recipes/demo_dpo.yaml method.beta=0.05
    deepspeed --num_gpus 2 --module sparsepo.train --config recipes/demo_dpo.yaml

Per optimiser step and micro-batch: the rows this rank owns (the schedule) -> collate -> reference
outputs from the run's one source (cache, inline or live; the loop does not know which) -> one
policy forward of chosen + rejected -> the loss from the method table, fed what its flags ask for
-> engine backward/step. Metrics are averaged over ranks and written by rank 0.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sparsepo import bridge as br
from sparsepo import checkpoint as ckpt
from sparsepo.config import RunConfig, config_fingerprint, lr_schedule
from sparsepo.engine.collectives import gather
from sparsepo.engine.dist import DistContext, init_distributed
from sparsepo.engine.policy import PolicyEngine
from sparsepo.losses import MethodSpec, get_method
from sparsepo.losses.inputs import build_loss_inputs, eos_positions
from sparsepo.metrics import MetricsLogger, reduce_mean
from sparsepo.models import pair_forward
from sparsepo.policy_samples import PolicySamples
from sparsepo.preemption import Preempted, PreemptionFlag
from sparsepo.preflight import preflight, resume_point
from sparsepo.reference.sources import open_source
from sparsepo.rundata import RunData, load_run_data, load_run_prompts
from sparsepo.rundir import release_run_dir
from sparsepo.schedule import Schedule

log = logging.getLogger("sparsepo")


@dataclass
class Run:
    cfg: RunConfig
    ctx: DistContext
    spec: MethodSpec
    data: RunData
    schedule: Schedule
    policy: PolicyEngine
    source: Any  # a reference source (sparsepo.reference.sources)
    features: Any  # SAEFeatures or None
    samples: Any  # PolicySamples (methods that need policy samples: SPO) or None
    metrics: MetricsLogger
    start: int
    total: int
    logits_chunk: int = 0  # model.logits_chunk (0: the plain path)


def setup(cfg: RunConfig, live=None) -> Run:
    """Everything before the first step. `live` = (ProcessPlan, bridge) on a policy rank of a live job."""
    ctx = init_distributed()
    spec = get_method(cfg.method.name, cfg.method.params)  # with the flags its knobs add (DPO's ld_alpha, wpo)
    pre = preflight(cfg, spec, ctx)  # stage file, batch split, SAE: before the data and the cache
    data = load_run_data(cfg, ctx)
    schedule = Schedule.from_config(cfg, num_rows=len(data.dataset), dp=ctx.world_size)
    if schedule.steps_per_epoch == 0:
        raise ValueError(f"{len(data.dataset)} pairs cannot fill one global batch of {schedule.global_batch} "
                         f"(micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum} x {ctx.world_size} "
                         f"ranks)")
    features, ds_config = pre.features, pre.ds_config
    resume = resume_point(cfg, ctx, data.fingerprint)  # before the engine and the cache
    total = cfg.train.max_steps or schedule.steps_per_epoch * cfg.train.epochs
    if ctx.is_main:
        (data.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    policy = PolicyEngine.build(cfg.model.path, ds_config, schedule=lr_schedule(cfg, total),
                                precision=cfg.train.precision, gradient_checkpointing=cfg.model.gradient_checkpointing,
                                lora=cfg.lora)
    start = 0 if resume is None else ckpt.restore(policy, resume, cfg, data_fingerprint=data.fingerprint, ctx=ctx)
    handshake = br.Handshake(start_step=start, total_steps=total, outputs=spec.reference_outputs,
                             config_fingerprint=config_fingerprint(cfg)) if live else None
    source = open_source(cfg, spec, ctx=ctx, dataset=data.dataset, collate=data.collate,
                         data_fingerprint=data.fingerprint, features=features, live=live, handshake=handshake,
                         policy=policy)
    samples = None
    if spec.needs_policy_samples:
        tok = data.tokenizer
        prompts = load_run_prompts(cfg, ctx, tok)
        samples = PolicySamples(cfg.generation, source=source, topk=cfg.reference.topk,
                                support=cfg.method.params.kl_support, seed=cfg.train.seed,
                                pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, prompts=prompts,
                                rank=ctx.rank, dp=ctx.world_size, grad_accum=cfg.train.grad_accum,
                                staleness=cfg.generation.staleness, chunk=cfg.model.logits_chunk)
        state = None if resume is None else ckpt.load_rank_state(resume, "samples", rank=ctx.rank,
                                                                  world_size=ctx.world_size)
        if state is not None and not samples.load_state_dict(state, device=ctx.device):
            state = None
        if ctx.is_main:
            log.info("SPO: %s reference, staleness %d step(s)%s", cfg.reference.mode, cfg.generation.staleness,
                     "" if state is None else "; SPO sample state restored from the checkpoint")
    metrics = MetricsLogger(data.run_dir, total_steps=total, start_step=start, enabled=ctx.is_main,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                            log_every=cfg.logging.log_every)
    if ctx.is_main:
        log.info("training %s on %d pairs: %d steps of %d pairs over %d rank(s)", spec.name, len(data.dataset),
                 total, schedule.global_batch, ctx.world_size)
    return Run(cfg=cfg, ctx=ctx, spec=spec, data=data, schedule=schedule, policy=policy, source=source,
               features=features, samples=samples, metrics=metrics, start=start, total=total,
               logits_chunk=cfg.model.logits_chunk)


def micro_step(run: Run, rows, step: int = 0, micro: int = 0) -> tuple[dict[str, torch.Tensor], float, int]:
    """One micro-batch: forward, loss, backward. Returns (metrics, seconds waiting for the reference, tokens)."""
    batch = run.data.batch(rows).to(run.ctx.device)
    t_ref = time.perf_counter()
    ref = run.source.get(batch)
    wait = time.perf_counter() - t_ref
    sample_fields, sample_metrics = run.samples.fields(run.policy, batch, step=step, micro=micro) \
        if run.samples is not None else (None, {})
    features = run.features
    with features.capture(run.policy) if features is not None else nullcontext() as cap:
        fwd = pair_forward(run.policy, batch, chunk=run.logits_chunk, sq_mass=run.spec.needs_sq_mass,
                           ids=ref.topk_ids if "topk_ids" in run.spec.reference_outputs else None)
    logged = run.metrics.due(step + 1) or step + 1 == run.total  # the SAE statistics: log steps and the last
    pooled, feature_metrics = features.policy(cap, batch, stats=logged) if features is not None else (None, {})
    eos = eos_positions(batch.input_ids, batch.response_mask, run.data.tokenizer.eos_token_id)
    out = run.spec.loss_fn(build_loss_inputs(run.spec, fwd, batch.response_mask, ref, pooled, sample_fields, eos),
                           run.cfg.method.params)
    loss = out.losses.mean()
    run.policy.backward(loss)
    run.policy.step()
    metrics = {"loss": loss.detach(), **out.metrics, **feature_metrics, **sample_metrics,
               "rewards_chosen": out.chosen_rewards.mean(), "rewards_rejected": out.rejected_rewards.mean()}
    return metrics, wait, int(batch.attention_mask.sum())


def train(cfg: RunConfig, live=None, preempt: PreemptionFlag | None = None) -> dict:
    """Train the policy described by `cfg`; returns the run summary (rank 0 writes it)."""
    run = setup(cfg, live)
    preempt = preempt or PreemptionFlag()
    accum, dp, last = cfg.train.grad_accum, run.ctx.world_size, {}
    for step, slots in run.schedule.steps(run.start, run.total, run.ctx.rank):
        t_step, wait, tokens, sums = time.perf_counter(), 0.0, 0, {}
        lr = run.policy.lr()  # the rate this step uses
        for slot in slots:
            metrics, w, n = micro_step(run, slot.rows, step, slot.micro)
            wait, tokens = wait + w, tokens + n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        step_time = time.perf_counter() - t_step
        last = reduce_mean({**sums, "step_time": step_time, "ref_wait": wait, "tokens_per_s": tokens * dp / step_time})
        last.update(lr=lr, grad_norm=run.policy.grad_norm())
        run.metrics.log(step + 1, last)
        stop = preempt.any_rank()
        if stop or ckpt.due(cfg, step + 1, run.total):
            ckpt.save(run.policy, cfg, run.data.run_dir, step=step + 1, samples=(step + 1) * run.schedule.global_batch,
                      data_fingerprint=run.data.fingerprint, ctx=run.ctx,
                      rank_state=None if run.samples is None else {"samples": run.samples.state_dict()})
        if stop:
            run.metrics.close()
            raise Preempted(f"preempted at step {step + 1}: checkpoint written; resume with --resume auto")
    run.metrics.close()
    run.source.finish()  # live: the reference group has finished its write-through
    return finish(run, last)


def finish(run: Run, last: dict) -> dict:
    """Gather the final model, write summary.json (rank 0)."""
    ctx, run_dir = run.ctx, run.data.run_dir
    run.policy.save_hf(run.data.tokenizer, run_dir / "final", is_main=ctx.is_main)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    shards = gather((*run.policy.parameter_counts(), peak_rss_mib))
    report = run.data.report
    summary = {"method": run.spec.name, "steps": run.total, "final": last, "config_fingerprint": config_fingerprint(run.cfg),
               "world_size": ctx.world_size, "parameters_per_rank": [s[0] for s in shards],
               "parameters_total": shards[0][1], "peak_rss_mib_per_rank": [round(s[2], 1) for s in shards],
               "data": asdict(report) if hasattr(report, "__dataclass_fields__") else str(report)}
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        log.info("done: final model in %s", run_dir / "final")
    release_run_dir(run_dir)
    return summary
