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
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sparsepo import bridge as br
from sparsepo import checkpoint as ckpt
from sparsepo.config import RunConfig, config_fingerprint, lr_schedule
from sparsepo.engine.collectives import gather
from sparsepo.engine.dist import DistContext, abort, init_distributed
from sparsepo.engine.policy import PolicyEngine
from sparsepo.logprobs.head import Head, head_chunk
from sparsepo.guard import NonFiniteGuard
from sparsepo.losses import MethodSpec, get_method
from sparsepo.config.load import to_dict
from sparsepo.evaluation import Evaluator
from sparsepo.metrics import MetricsLogger, MetricWindow, pair_values, reduce_mean, token_stats
from sparsepo.pair_loss import forward_loss
from sparsepo.policy_samples import PolicySamples
from sparsepo.preemption import Preempted, PreemptionFlag
from sparsepo.preflight import preflight, resume_point
from sparsepo import follow, liveness
from sparsepo.reference_role.sources import ReferenceSource, open_eval_source, open_source
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
    source: ReferenceSource  # cache, inline or live (sparsepo.reference_role.sources)
    features: Any  # SAEFeatures or None
    samples: Any  # PolicySamples (methods that need policy samples: SPO) or None
    metrics: MetricsLogger
    start: int
    total: int
    head: Any = None  # the policy's log-prob Head (sparsepo.logprobs.head), bound where the engine is built
    evaluator: Evaluator | None = None  # held-out pairs (eval.path / split / fraction), or None
    num_tokens: float = 0.0  # tokens seen by all ranks since the run's first step (TRL's num_tokens; kept in checkpoints)


def setup(cfg: RunConfig, live=None) -> Run:
    """Everything before the first step. `live` = (ProcessPlan, bridge) on a policy rank of a live job."""
    ctx = init_distributed()
    if live is None and ctx.world_size > 1:  # a live job's watchdog already runs on the bridge (train.run_live)
        watch_peers(cfg.train.peer_timeout_s, ctx)
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
                                attn_implementation=cfg.model.attn_implementation, lora=cfg.lora)
    head = Head.for_model(policy, head_chunk(cfg))
    start = 0 if resume is None else ckpt.restore(policy, resume, cfg, data_fingerprint=data.fingerprint, ctx=ctx)
    handshake = br.Handshake(start_step=start, total_steps=total, outputs=spec.reference_outputs,
                             config_fingerprint=config_fingerprint(cfg)) if live else None
    source = open_source(cfg, spec, ctx=ctx, dataset=data.dataset, collate=data.collate,
                         data_fingerprint=data.fingerprint, features=features, live=live, handshake=handshake,
                         policy=policy)
    if resume is not None and cfg.reference.sync_alpha is not None:
        restore_reference(source, resume, ctx)
    samples = open_samples(cfg, ctx, data, source, resume, head) if spec.needs_policy_samples else None
    metrics = MetricsLogger(data.run_dir, total_steps=total, start_step=start, enabled=ctx.is_main,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                            log_every=cfg.logging.log_every, config=to_dict(cfg),
                            report_to=tuple(cfg.logging.report_to))
    evaluator = None if data.eval_dataset is None else Evaluator(
        batch=data.eval_batch, num_rows=len(data.eval_dataset), batch_size=cfg.eval.batch_size,
        every_steps=cfg.eval.every_steps, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
        source=open_eval_source(cfg, spec, source, ctx=ctx, dataset=data.eval_dataset, collate=data.collate,
                                data_fingerprint=data.eval_fingerprint, features=features))
    if ctx.is_main:
        log.info("training %s on %d pairs: %d steps of %d pairs over %d rank(s)", spec.name, len(data.dataset),
                 total, schedule.global_batch, ctx.world_size)
    return Run(cfg=cfg, ctx=ctx, spec=spec, data=data, schedule=schedule, policy=policy, source=source,
               features=features, samples=samples, metrics=metrics, start=start, total=total,
               head=head, evaluator=evaluator,
               num_tokens=0.0 if resume is None else float(ckpt.read_meta(resume).get("num_tokens", 0.0)))


def open_samples(cfg: RunConfig, ctx: DistContext, data: RunData, source, resume, head) -> PolicySamples:
    """SPO's policy samples, with their state from the checkpoint when resuming."""
    tok = data.tokenizer
    prompts = load_run_prompts(cfg, ctx, tok)
    samples = PolicySamples(cfg.generation, source=source, topk=cfg.reference.topk,
                            support=cfg.method.params.kl_support, seed=cfg.train.seed,
                            pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, prompts=prompts,
                            rank=ctx.rank, dp=ctx.world_size, grad_accum=cfg.train.grad_accum,
                            staleness=cfg.generation.staleness, head=head)
    state = None if resume is None else ckpt.load_rank_state(resume, "samples", rank=ctx.rank,
                                                              world_size=ctx.world_size)
    if state is not None and not samples.load_state_dict(state, device=ctx.device):
        state = None
    if ctx.is_main:
        log.info("SPO: %s reference, staleness %d step(s)%s", cfg.reference.mode, cfg.generation.staleness,
                 "" if state is None else "; SPO sample state restored from the checkpoint")
    return samples


def micro_step(run: Run, rows, step: int = 0, micro: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """One micro-batch: forward, loss, backward. Returns (metrics as 0-dim device tensors, seconds
    waiting for the reference); nothing here waits for the device."""
    batch = run.data.batch(rows).to(run.ctx.device)
    t_ref = time.perf_counter()
    ref = run.source.get(batch)
    wait = time.perf_counter() - t_ref
    sample_fields, sample_metrics = run.samples.fields(run.policy, batch, step=step, micro=micro) \
        if run.samples is not None else (None, {})
    logged = run.metrics.due(step + 1) or step + 1 == run.total  # the SAE statistics: log steps and the last
    out, fwd, feature_metrics = forward_loss(run.head, batch, ref, run.spec, run.cfg.method.params,
                                             eos_id=run.data.tokenizer.eos_token_id, features=run.features,
                                             sample_fields=sample_fields, stats=logged,
                                             router_aux=run.cfg.model.router_aux_loss_coef > 0)
    loss = out.losses.mean()
    if fwd.aux_loss is not None:  # an MoE policy's router load-balancing loss (model.router_aux_loss_coef)
        loss = loss + run.cfg.model.router_aux_loss_coef * fwd.aux_loss
        sample_metrics = {**sample_metrics, "router_aux_loss": fwd.aux_loss.detach()}
    run.policy.backward(loss)
    run.policy.step()
    return {**step_metrics(out, fwd, batch.response_mask, batch.input_ids), **feature_metrics, **sample_metrics,
            "loss": loss.detach(), "tokens": batch.attention_mask.sum()}, wait


def step_metrics(out, fwd, mask, batch_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A micro-batch's means: the method's own metrics and TRL's names (`metrics.pair_values`),
    `logits/chosen|rejected` where the forward held full logits (model.logits_chunk=0), and on log
    steps `entropy` and `mean_token_accuracy` (`metrics.token_stats`; `batch_ids` the input ids)."""
    b = mask.shape[0] // 2
    values = {k: v.mean() for k, v in pair_values(out.losses, out.chosen_rewards, out.rejected_rewards,
                                                  fwd.seq_logps[:b], fwd.seq_logps[b:]).items()}
    values.update(token_stats(fwd, batch_ids, mask))
    own_logps = {k: out.metrics[k] for k in ("logps/chosen", "logps/rejected") if k in out.metrics}  # LD-DPO's
    return {**out.metrics, **values, **own_logps}


def train(cfg: RunConfig, live=None, preempt: PreemptionFlag | None = None) -> dict:
    """Train the policy described by `cfg`; returns the run summary (rank 0 writes it)."""
    run = setup(cfg, live)
    preempt = preempt or PreemptionFlag()
    accum, last, window, evals = cfg.train.grad_accum, {}, MetricWindow(), {}
    guard = NonFiniteGuard.for_engine(cfg.train.max_nonfinite_steps, run.policy, cfg.train.precision)  # no NaN model published
    unsealed = None  # checkpoint.async_write: the checkpoint DeepSpeed writes during this step
    for step, slots in run.schedule.steps(run.start, run.total, run.ctx.rank):
        t_step, wait, sums = time.perf_counter(), 0.0, {}
        lr = run.policy.lr()  # the rate this step uses
        for slot in slots:
            metrics, w = micro_step(run, slot.rows, step, slot.micro)
            wait += w
            for k, v in metrics.items():  # device tensors: summed where they are
                sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v / accum)
        if unsealed is not None:  # this step's optimiser boundary committed it
            t_seal = time.perf_counter()
            ckpt.seal_written(unsealed, cfg, run.ctx)
            if run.ctx.is_main:
                log.info("checkpoint %s: sealed in %.2f s", unsealed.tag_dir.name, time.perf_counter() - t_seal)
            unsealed = None
        window.add({**sums, "step_time": time.perf_counter() - t_step, "ref_wait": wait})
        run.metrics.advance()
        stop = preempt.any_rank()
        saving = stop or ckpt.due(cfg, step + 1, run.total)
        # a checkpoint step is a log step: num_tokens is then whole in the checkpoint, and a resumed run's
        # windows start where the uninterrupted run's do
        log_step = run.metrics.due(step + 1) or step + 1 == run.total or saving
        logged = window_means(run, window, step + 1, lr) if log_step else {}
        guard.step(step + 1, logged, run.policy)  # loss / grad norm on log steps; DeepSpeed's skip count every step
        if log_step:
            run.metrics.log(step + 1, logged)
            last = logged
        if follow.due(cfg, step + 1):  # TR-DPO: the reference follows the policy (collective)
            t_sync = time.perf_counter()
            run.source.follow(run.policy, cfg.reference.sync_alpha, step + 1)
            if run.ctx.is_main:
                log.info("TR-DPO: step %d: the reference followed the policy in %.3f s", step + 1,
                         time.perf_counter() - t_sync)
        if run.evaluator is not None and run.evaluator.due(step + 1, run.total):
            evals = run_eval(run, step + 1)
        if saving:
            guard.check_weights(run.policy, f"at step {step + 1}, before its checkpoint")
            saved = ckpt.save(run.policy, cfg, run.data.run_dir, step=step + 1, samples=(step + 1) * run.schedule.global_batch,
                              data_fingerprint=run.data.fingerprint, ctx=run.ctx, rank_state=rank_state(run),
                              num_tokens=run.num_tokens,
                              wait=stop or step + 1 == run.total)
            unsealed = saved if isinstance(saved, ckpt.Unsealed) else None
        if stop:
            run.metrics.close()
            raise Preempted(f"preempted at step {step + 1}: checkpoint written; resume with --resume auto")
    run.metrics.close()
    guard.check_weights(run.policy, "before the final model")
    run.source.finish()  # live: the reference group has finished its write-through
    return finish(run, last, evals)


def watch_peers(limit_s: float, ctx: DistContext) -> None:
    """The liveness watchdog of a cache / inline run on several ranks, on the store its process group
    started from (rank 0 hosts it): a lost rank is named and the others leave within `limit_s`."""
    import os

    liveness.Watchdog.start(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.rank, ctx.world_size,
                            limit_s=limit_s, names=lambda r: f"policy rank {r}", exit_fn=abort,
                            limit_name="train.peer_timeout_s")


def rank_state(run: Run) -> dict:
    """What each rank adds to a checkpoint besides DeepSpeed's: SPO's sample rounds, TR-DPO's moved reference."""
    state = {} if run.samples is None else {"samples": run.samples.state_dict()}
    if run.cfg.reference.sync_alpha is not None:
        state["reference"] = run.source.follow_state()
    return state


def restore_reference(source, resume, ctx) -> None:
    """TR-DPO: the reference as the checkpoint's run had moved it (else the resume would score against
    the initial reference); on another world size, from every saved rank's part."""
    if ckpt.read_meta(resume)["world_size"] == ctx.world_size:
        state = ckpt.load_rank_state(resume, "reference", rank=ctx.rank, world_size=ctx.world_size)
        if state is not None:
            return source.load_follow_state(state)
    else:
        saved = ckpt.every_rank_state(resume, "reference")
        if saved is not None:
            return source.load_follow_states(*saved)
    raise ckpt.CheckpointError(f"checkpoint {resume} holds no TR-DPO reference (reference-rank<r>.pt, written "
                               f"by sparsepo since TR-DPO): start a new run, or resume from a newer checkpoint")


def window_means(run: Run, window: MetricWindow, step: int, lr: float) -> dict[str, float]:
    """The log step's scalars: the window's means over steps and ranks (one host transfer, one all-reduce),
    with TRL's `learning_rate`, `grad_norm` (of this step), `epoch` and `num_tokens` (all ranks,
    counted from the run's first step, across resumes)."""
    n = window.counts.get("step_time", 1)
    scalars = reduce_mean(window.flush())
    tokens = scalars.pop("tokens") * run.ctx.world_size  # per step, all ranks
    run.num_tokens += tokens * n
    scalars.update(tokens_per_s=tokens / scalars["step_time"], lr=lr, learning_rate=lr,
                   grad_norm=run.policy.grad_norm(), epoch=step / run.schedule.steps_per_epoch,
                   num_tokens=run.num_tokens)
    return scalars


def run_eval(run: Run, step: int) -> dict[str, float]:
    """The held-out pairs scored by the policy as it is now, with the same loss (`forward_loss`)."""
    scalars = run.evaluator.run(lambda batch, ref: forward_loss(
        run.head, batch, ref, run.spec, run.cfg.method.params, eos_id=run.data.tokenizer.eos_token_id,
        features=run.features, stats=True)[:2], run.policy.module)
    run.metrics.log(step, scalars, prefix="eval")
    return scalars


def finish(run: Run, last: dict, evals: dict | None = None) -> dict:
    """Gather the final model, write summary.json (rank 0)."""
    ctx, run_dir = run.ctx, run.data.run_dir
    run.policy.save_hf(run.data.tokenizer, run_dir / "final", is_main=ctx.is_main)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    shards = gather((*run.policy.parameter_counts(), peak_rss_mib))
    report = run.data.report
    summary = {"method": run.spec.name, "steps": run.total, "final": last, "config_fingerprint": config_fingerprint(run.cfg),
               "eval": evals or {}, "world_size": ctx.world_size, "parameters_per_rank": [s[0] for s in shards],
               "parameters_total": shards[0][1], "peak_rss_mib_per_rank": [round(s[2], 1) for s in shards],
               "data": asdict(report) if hasattr(report, "__dataclass_fields__") else str(report)}
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        log.info("done: final model in %s", run_dir / "final")
    release_run_dir(run_dir)
    return summary
