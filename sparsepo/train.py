"""Entry point for launchers: one process of a training run.

    deepspeed --num_gpus 2 --module sparsepo.train --config sparsepo/recipes/demo.yaml method.name=simpo
    torchrun --nproc_per_node 2 -m sparsepo.train --config ...
    mpirun -np 2 python -m sparsepo.train --config ...

Extra arguments are dotted config overrides. Exits through sparsepo.engine.dist.shutdown (clean gloo teardown)
with 0 (done), 1 (error), 2 (config error: `sparsepo.prelaunch`, checked in every process before any
process group starts, and later CONFIG_ERRORS) or 3 (preempted: checkpoint written, requeue and
resume with --resume auto). In live mode (reference.mode=live) every process of the job leaves
within about reference.timeout_s once a peer of either role is lost (1, naming it) or the policy
was preempted (3): sparsepo.liveness.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

from sparsepo.config.argv import parse_with_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsepo train", description="Train a policy with a preference method.")
    p.add_argument("--config", help="YAML run config (default: the built-in defaults)")
    p.add_argument("--resume", help="auto | a checkpoint directory (same as checkpoint.resume=...)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.beta=0.05 train.max_steps=20 "
                                                "(anywhere on the command line, before or after options)")
    return parse_with_overrides(p, argv)


def run_live(cfg, preempt) -> None:
    """One job, two roles: rewrite this process's torch.distributed environment for its role's own
    world (DeepSpeed must own a whole world), join the bridge that spans every process, and run
    either a policy rank or a reference stage."""
    from sparsepo.bridge import connect
    from sparsepo.launch.process import plan
    from sparsepo.prelaunch import live_layers
    from sparsepo.reference_role.server import check_live_topology, serve
    from sparsepo.trainer import train

    # a family the pipeline cannot split exactly: refused before anything loads (SePO: the checked oracle pair)
    p = plan(cfg.topology, os.environ, num_layers=live_layers(cfg))
    check_live_topology(p.topology)
    if p.launch.rank == 0:
        logging.getLogger("sparsepo").info("live topology:\n%s", p.topology.describe(p.launch))
    os.environ.update(p.env)
    bridge = connect(*p.bridge, p.launch.rank, p.launch.world_size, cfg.reference.timeout_s)
    # no rank of either role waits on a lost peer for more than reference.timeout_s (sparsepo.liveness)
    from sparsepo import liveness
    from sparsepo.engine.dist import abort, set_group_timeout

    liveness.Watchdog.start(*p.bridge, p.launch.rank, p.launch.world_size, limit_s=cfg.reference.timeout_s,
                            names=lambda r: rank_name(p.topology, r), exit_fn=abort)
    set_group_timeout(liveness.group_timeout_s(cfg.reference.timeout_s))
    if p.role.is_reference:
        from sparsepo.engine.dist import init_distributed

        init_distributed()
        serve(cfg, p, bridge)
    else:
        train(cfg, live=(p, bridge), preempt=preempt)


def rank_name(topo, global_rank: int) -> str:
    """A global rank of a live job as the logs name it: its role, stage/index and global rank."""
    role = topo.role_of(global_rank)
    if role.is_policy:
        return f"policy rank {role.index} (global rank {global_rank})"
    replica = f", replica {role.replica}" if (role.num_replicas or 1) > 1 else ""
    return f"reference group (stage {role.stage}{replica}, rank {global_rank})"


def _peer_cause():
    """Live mode, after an error: a lost, failed or preempted peer that caused it (sparsepo.liveness
    `verdict`: exit code, why, peer to blame), or None."""
    from sparsepo import liveness

    watch = liveness.active()
    return watch.explain(wait_s=5.0) if watch is not None else None


def _leave(code: int, message: str, blame: int | None = None) -> int:
    """Live mode: post this process's end to the other processes (sparsepo.liveness)."""
    from sparsepo import liveness

    watch = liveness.active()
    if watch is not None:
        watch.end({0: liveness.DONE, 3: liveness.PREEMPTED}.get(code, liveness.FAILED), message[:2000], blame)
    return code


def _launch_shape() -> dict:
    """This launch's world_size and ranks_per_node, or None for both when its environment cannot be
    read here (live mode's `plan` then says why; deepspeed's init reads it in cache mode)."""
    from sparsepo.launch.environ import global_launch_env
    from sparsepo.launch.topology import TopologyError

    try:
        launch = global_launch_env(os.environ)
    except TopologyError:
        return {"world_size": None}
    return {"world_size": launch.world_size, "ranks_per_node": launch.ranks_per_node}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from sparsepo.preemption import PreemptionFlag

    preempt = PreemptionFlag()  # first: a SIGUSR1/SIGTERM during start-up must not kill us uncheckpointed
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # deepspeed calls torch.distributed collectives that torch has renamed; one warning per step otherwise
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from sparsepo.lean_imports import lean_training_process
    from sparsepo.prelaunch import CONFIG_ERRORS, check_command

    lean_training_process()  # before any model class or dataset: -60 MiB of RSS per process (lean_imports)

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:  # the CLI's own pre-launch check, in every process of every launcher: exit 2 before any process group
        cfg = check_command(args.config, overrides, **_launch_shape())
    except CONFIG_ERRORS as e:
        print(f"sparsepo: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - the same checks' other failures (e.g. an unreadable oracle): one line
        print(f"sparsepo: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    from sparsepo.engine.dist import shutdown
    from sparsepo.preemption import EXIT_PREEMPTED, Preempted
    from sparsepo.trainer import train

    code, message, blame = 0, "", None
    log = logging.getLogger("sparsepo")
    try:
        if cfg.reference.mode == "live":
            run_live(cfg, preempt)
        elif cfg.reference.mode == "precompute":
            from sparsepo.reference_role.precompute import precompute

            precompute(cfg)
        else:
            train(cfg, preempt=preempt)
    except Preempted as e:
        log.warning("%s", e)
        code, message = EXIT_PREEMPTED, str(e)
    except CONFIG_ERRORS as e:  # found only once the run started (the handshake, a batch split): still exit 2
        code, message = 2, f"config error: {e}"
        log.error("%s", message)
    except Exception as e:  # every rank reports, then leaves without hanging its peers
        code, message, blame = report_failure(e)
    shutdown(_leave(code, message, blame))


def report_failure(e: Exception) -> tuple[int, str, int | None]:
    """Log a failure of this process: (exit code, message, peer to blame). In live mode, when a peer
    caused it (lost, failed or preempted), the first line names that peer and its role, and the local
    symptom (often a raw gloo `Connection closed by peer`) follows."""
    from sparsepo.preemption import EXIT_PREEMPTED

    log = logging.getLogger("sparsepo")
    message = f"{type(e).__name__}: {e}"
    peer = _peer_cause()
    if peer is not None and peer[0] == EXIT_PREEMPTED:  # the job was preempted: this is no error
        log.warning("%s (here: %s)", peer[1], message[:300])
        return EXIT_PREEMPTED, peer[1], None
    if peer is not None:
        log.error("%s", peer[1])
        log.error("(here, as a consequence: %s)", message[:500])
    else:
        log.error("%s", message)
    if os.environ.get("SPARSEPO_DEBUG"):
        traceback.print_exc()
    return 1, message, None if peer is None else peer[2]


if __name__ == "__main__":
    main()
