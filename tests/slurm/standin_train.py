"""A stand-in for `python -m sparsepo.train`, for testing launch paths without DeepSpeed.

    SPARSEPO_ENTRY=tests/slurm/standin_train.py launcher/launch.sh -- logging.output_dir=DIR train.max_steps=50

Joins the torch.distributed world (gloo) from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT exactly
like the trainer, does one all_reduce per "step" (sleeping standin.step_s between steps), writes
`DIR/rank{r}.json` with what it saw, a checkpoint marker every checkpoint.every_steps, and
`DIR/summary.json` at the end. SIGUSR1 / SIGTERM: finish the step, checkpoint, exit 3 (like the
trainer); `--resume auto` continues from the last marker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    opts: dict[str, str] = {}
    resume = None
    i = 0
    while i < len(args):
        if args[i] in ("--config", "--resume"):
            if args[i] == "--resume":
                resume = args[i + 1]
            i += 2
            continue
        if "=" in args[i]:
            k, v = args[i].split("=", 1)
            opts[k] = v
        i += 1
    out = Path(opts.get("logging.output_dir", "runs/standin"))
    steps = int(opts.get("train.max_steps", "6"))
    every = int(opts.get("checkpoint.every_steps", "0"))
    step_s = float(opts.get("standin.step_s", "0.05"))

    got = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: got.append(s))

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoints"
    start = 0
    if resume is not None and (ckpt / "latest").is_file():
        start = int((ckpt / "latest").read_text())
        if rank == 0:
            print(f"resumed from {ckpt / 'latest'}: continuing at step {start}", file=sys.stderr, flush=True)
    elif ckpt.is_dir() and resume is None:
        print(f"{ckpt} already holds checkpoints: pass --resume auto", file=sys.stderr)
        dist.destroy_process_group()
        os._exit(1)
    info = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                           "OMP_NUM_THREADS", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                                           "SLURM_PROCID", "SLURMD_NODENAME", "SLURM_RESTART_COUNT")}
    info.update(host=socket.gethostname(), pid=os.getpid(), argv=args, world=dist.get_world_size(),
                rank_seen=dist.get_rank())
    (out / f"rank{rank}.json").write_text(json.dumps(info, indent=1))

    def save(step: int) -> None:
        dist.barrier()
        if rank == 0:
            (ckpt / f"step-{step:08d}").mkdir(parents=True, exist_ok=True)
            (ckpt / "latest").write_text(str(step))
        dist.barrier()

    total = torch.zeros(1)
    for step in range(start, steps):
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        total += t
        time.sleep(step_s)
        flag = torch.tensor([1.0 if got else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rank == 0:
            (out / "progress").write_text(str(step + 1))
        if flag.item() or (every and (step + 1) % every == 0) or step + 1 == steps:
            save(step + 1)
        if flag.item():
            if rank == 0:
                print(f"preempted at step {step + 1}: checkpoint written; resume with --resume auto",
                      file=sys.stderr, flush=True)
            dist.destroy_process_group()
            os._exit(3)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps({"steps": steps, "world": world,
                                                      "sum": world * (world + 1) / 2}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
