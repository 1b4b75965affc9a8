"""Randomized kill soak (issue 25): stop or kill one process of a training job at a random moment,
resume with `--resume auto`, and compare the loss curve with an uninterrupted run of the same job.

    python benchmarks/soak.py --trials 6 --modes cache,live --out docs/soak.json

Each trial draws a job mode (cache: 2 policy ranks; live: 2 policy ranks + 1 reference rank), a
process (a random rank of either role), a signal (SIGKILL, or SIGSTOP: the job must leave by itself,
else the soak kills the process group as a scheduler would) and a moment (a random time after the
first step, inside a checkpoint's shard write, or after the last step: the end handshake and the
final save). Then `--resume auto` runs to the end. A trial's verdict:

* identical: the resumed run finished and its loss at every step equals the uninterrupted run's
  (|diff| <= --tol), or the job had finished before the signal landed and its curve equals it;
* refused: the resume exited non-zero naming why, publishing no final/;
* DIFFERENT / FAILED: what the soak looks for: a curve that differs, or a resume that broke;
* missed: the job had ended before the drawn moment (nothing signalled; its curve still checked).

The interrupted run's first ERROR line is recorded too (it must name the lost process).
Needs psutil; builds the tiny demo world under --workdir unless --world points at one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import RECIPE, scalars  # noqa: E402
from sparsepo.cli import train_command  # noqa: E402

STEPS, EVERY = 24, 4
COMMON = ["method.name=dpo", "optim.schedule=constant", "optim.warmup_steps=3", "optim.lr=1e-3",
          f"checkpoint.every_steps={EVERY}", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
          "checkpoint.keep_last=2", "reference.timeout_s=20", "train.peer_timeout_s=20", "logging.log_every=1",
          "logging.progress=false"]
MODES = {"cache": ([], 2, 0), "live": (["reference.mode=live", "topology.reference_ranks=1"], 3, 1)}
MOMENTS = ("random", "shard_write", "end")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def command(world, run: Path, mode: str, resume: str | None = None) -> list[str]:
    extra, nproc, _ = MODES[mode]
    return train_command(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                  f"logging.output_dir={run}", *COMMON, *extra], nproc=nproc, resume=resume)


def release_shm(cmd) -> None:
    """DeepSpeed's CPU shm buffers of this launch (never unlinked by DeepSpeed)."""
    if "--master_port" in cmd:
        port = cmd[cmd.index("--master_port") + 1]
        for buf in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            buf.unlink(missing_ok=True)


def run_to_end(cmd, log: Path, timeout: float = 600) -> int:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    release_shm(cmd)
    return proc.returncode


def rank_pid(launcher: int, rank: int) -> int | None:
    import psutil

    try:
        for child in psutil.Process(launcher).children(recursive=True):
            if f"--local_rank={rank}" in " ".join(child.cmdline()):
                return child.pid
    except psutil.Error:  # the job ended meanwhile
        pass
    return None


def timed_baseline(cmd, log: Path) -> float:
    """Run the uninterrupted job; returns the seconds from its first logged step to its exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    first = None
    while proc.poll() is None:
        if first is None and steps_logged(log):
            first = time.monotonic()
        time.sleep(0.05)
    release_shm(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"baseline failed ({proc.returncode}): see {log}")
    return time.monotonic() - (first or time.monotonic())


def steps_logged(log: Path) -> list[int]:
    return [int(s) for s in re.findall(r"INFO sparsepo: step (\d+) loss=", log.read_text(errors="replace"))]


def wait_for_moment(moment: str, run: Path, log: Path, proc, rng: random.Random, deadline: float,
                    span: float) -> str:
    """Block until `moment` (or the job's end); returns what was hit."""
    ckpts = run / "checkpoints"
    while time.monotonic() < deadline and proc.poll() is None:
        steps = steps_logged(log)
        if moment == "random" and steps:
            pause = rng.uniform(0.0, 0.5 * span)  # inside the training part of the baseline's span
            time.sleep(pause)
            return f"random ({pause:.1f}s after step {max(steps)})"
        if moment == "shard_write" and ckpts.is_dir():
            for tag in ckpts.glob("step-*"):
                if tag.is_dir() and not (tag / "sparsepo.json").exists() and any(tag.iterdir()):
                    return f"shard_write ({tag.name} unsealed)"
        if moment == "end" and STEPS in steps:
            return "end (after the last step)"
        time.sleep(0.003)
    return "missed (the job ended first)"


def first_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if " ERROR " in ln]
    return lines[0][:300] if lines else ""


def trial(k: int, world, base: dict, span: dict, workdir: Path, rng: random.Random, modes: list[str],
          tol: float) -> dict:
    mode = rng.choice(modes)
    _, nproc, ref_ranks = MODES[mode]
    rank = rng.randrange(nproc)
    role = "reference" if rank >= nproc - ref_ranks else "policy"
    sig = rng.choice(["SIGKILL", "SIGSTOP"])
    moment = rng.choice(MOMENTS)
    run = workdir / f"trial-{k:02d}-{mode}"
    shutil.rmtree(run, ignore_errors=True)
    log1, log2 = run.with_suffix(".killed.log"), run.with_suffix(".resumed.log")
    cmd = command(world, run, mode)
    with open(log1, "w") as out:
        proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    hit = wait_for_moment(moment, run, log1, proc, rng, t0 + 300, span[mode])
    pid = rank_pid(proc.pid, rank) if proc.poll() is None else None
    if pid is not None:
        os.kill(pid, getattr(signal, sig))
    left_by_itself = True
    try:
        rc1 = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        left_by_itself = False
        os.killpg(proc.pid, signal.SIGKILL)
        rc1 = proc.wait()
    release_shm(cmd)
    out = {"trial": k, "mode": mode, "target": f"{role} (global rank {rank})", "signal": sig, "moment": hit,
           "signalled": pid is not None, "interrupted_rc": rc1, "left_by_itself": left_by_itself,
           "first_error": first_error(log1), "leave_s": round(time.monotonic() - t0, 1)}
    finished = rc1 == 0 and (run / "final").is_dir()
    if not finished:
        out["resume_rc"] = run_to_end(command(world, run, mode, resume="auto"), log2)
        out["resume_first_error"] = first_error(log2)
    curve = scalars(run, "train/loss")
    diff = max((abs(curve[s] - base[mode][s]) for s in base[mode] if s in curve), default=None)
    complete = sorted(curve) == sorted(base[mode])
    out["max_abs_diff"] = diff
    if pid is None:  # the job ended before the moment came: no interruption to judge
        out["verdict"] = "missed" if finished and complete and diff is not None and diff <= tol else "FAILED"
    elif (finished or out.get("resume_rc") == 0) and complete and diff is not None and diff <= tol:
        out["verdict"] = "identical"
    elif not finished and out.get("resume_rc") not in (0, None) and not (run / "final").exists():
        out["verdict"] = "refused"
    else:
        out["verdict"] = "DIFFERENT" if complete else "FAILED"
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--modes", default="cache,live", help="comma list of: " + ", ".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5, help="largest |loss difference| counted as identical")
    p.add_argument("--workdir", default="runs/soak")
    p.add_argument("--world", help="an existing demo world directory (default: build a tiny one in --workdir)")
    p.add_argument("--out", default="docs/soak.json")
    a = p.parse_args(argv)
    from sparsepo.demo import prepare_world

    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    world = prepare_world(Path(a.world) if a.world else workdir / "world", size="tiny", progress=False)
    modes = a.modes.split(",")
    base, span = {}, {}
    for mode in modes:
        run = workdir / f"baseline-{mode}"
        shutil.rmtree(run, ignore_errors=True)
        span[mode] = timed_baseline(command(world, run, mode), run.with_suffix(".log"))
        base[mode] = scalars(run, "train/loss")
    rng = random.Random(a.seed)
    t0, results = time.perf_counter(), []
    for k in range(a.trials):
        results.append(trial(k, world, base, span, workdir, rng, modes, a.tol))
        print(json.dumps(results[-1]), flush=True)
    counts = {v: sum(r["verdict"] == v for r in results) for v in sorted({r["verdict"] for r in results})}
    report = {"trials": a.trials, "seed": a.seed, "steps": STEPS, "checkpoint_every": EVERY, "tol": a.tol,
              "baseline_span_s": {m: round(v, 1) for m, v in span.items()},
              "verdicts": counts, "wall_s": round(time.perf_counter() - t0, 1), "results": results}
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(counts))
    sys.exit(0 if set(counts) <= {"identical", "refused", "missed"} else 1)


if __name__ == "__main__":
    main()
