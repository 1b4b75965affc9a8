"""The sbatch templates on a real Slurm cluster (slurmctld + 2 emulated slurmd nodes on loopback,
started by tests/slurm/slurm-up.sh, needs root): the 2-node CPU smoke job, and preemption ->
checkpoint -> `scontrol requeue` -> resume, ending bit-identical to an uninterrupted run.

Every job writes its log to a file under the cluster directory; failures print it together with the
Slurm daemons' logs."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, RECIPE, free_port, read_scalars

pytestmark = pytest.mark.slurm

SLURM_TESTS = REPO / "tests" / "slurm"
TEMPLATES = REPO / "slurm"
STANDIN = SLURM_TESTS / "standin_train.py"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
_LEAKY = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMIX_", "PMI_")
_DIST = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "SPARSEPO_LAUNCH_MODE",
         "SPARSEPO_ENTRY", "SPARSEPO_DRY_RUN", "SPARSEPO_RESUME", "SPARSEPO_ROOT", "REFERENCE_NODES"}


def _ports_free(first: int, count: int) -> bool:
    for port in range(first, first + count):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def _pick_ports(count: int) -> int:
    """A block of free ports for slurmctld + slurmd's, away from the jobs' MASTER_PORTs (20000-29999)."""
    for _ in range(200):
        first = random.randrange(40000, 60000)
        if _ports_free(first, count):
            return first
    raise RuntimeError("no free block of ports for the test cluster")


def _tail(path: Path, n: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<{e}>"


def _torch_extensions_dir() -> str:
    """The JIT-ops cache the other tests use (torch's default), so DeepSpeed's ops compile once."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions")


@dataclass
class Cluster:
    base: Path
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                                 f"{self.daemon_logs()}")
        return proc

    def job_env(self, **extra: str) -> dict[str, str]:
        env = dict(self.env)
        env.update(SPARSEPO_PYTHON=sys.executable, TORCH_EXTENSIONS_DIR=_torch_extensions_dir(),
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def sbatch(self, template: str, *args: str, out: Path, wait: bool = False, timeout: float = 30,
               env: dict[str, str] | None = None, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        cmd = ["sbatch", "--parsable", f"--output={out}", *(["--wait"] if wait else []), *options,
               str(TEMPLATES / template), *args]
        return subprocess.run(cmd, env=env or self.job_env(), cwd=self.base, capture_output=True, text=True,
                              timeout=timeout)

    def job(self, jid: str) -> dict[str, str]:
        proc = self.run("scontrol", "show", "job", "-o", jid, check=False)
        info: dict[str, str] = {}
        for field in proc.stdout.split():
            if "=" in field:
                k, v = field.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_job(self, jid: str, until, *, timeout: float, what: str, log: Path) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(jid)
            if until(info):
                return info
            if info.get("JobState") in TERMINAL:
                break
            time.sleep(0.5)
        self.cancel(jid)
        raise AssertionError(f"job {jid}: {what} did not happen within {timeout:.0f} s; last state "
                             f"{info.get('JobState')} Restarts={info.get('Restarts')} ExitCode={info.get('ExitCode')}\n"
                             f"--- job log {log}\n{_tail(log)}\n{self.daemon_logs()}")

    def cancel(self, jid: str) -> None:
        subprocess.run(["scancel", "--full", jid], env=self.env, capture_output=True, timeout=30)

    def jobcomp(self, jid: str) -> list[dict[str, str]]:
        rows = []
        for line in _tail(self.base / "log" / "jobcomp.log", 10000).splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") == jid:
                rows.append(fields)
        return rows

    def daemon_logs(self) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(f"--- {p}\n{_tail(p, 30)}" for p in logs)


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root: the test starts its own slurmctld + slurmd (tests/slurm/slurm-up.sh)")
    # world-traversable (not pytest's mode-700 tmp dir): munged checks its socket directory
    base = Path(tempfile.mkdtemp(prefix="sparsepo-slurm-", dir="/tmp"))
    base.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY) and k not in _DIST}
    env.update(SLURM_CI_DIR=str(base), SLURM_CI_PORT=str(_pick_ports(3)), SLURM_CI_NODES="2", SLURM_CI_CPUS="2",
               SLURM_CI_FIRST_JOB_ID=str(random.randrange(1000, 9000)), SLURM_CONF=str(base / "etc" / "slurm.conf"))
    down = ["bash", str(SLURM_TESTS / "slurm-down.sh")]
    try:
        up = subprocess.run(["bash", str(SLURM_TESTS / "slurm-up.sh")], env=env, capture_output=True, text=True,
                            timeout=900)  # includes apt-get install on a fresh machine
    except subprocess.TimeoutExpired:
        subprocess.run(down, env=env, capture_output=True, timeout=120)
        pytest.fail("slurm-up.sh did not finish in 15 minutes")
    if up.returncode != 0:
        logs = Cluster(base, env).daemon_logs()
        subprocess.run(down, env=env, capture_output=True, timeout=120)
        if up.returncode == 77:
            pytest.skip(f"cannot start a local Slurm cluster here: {up.stderr.strip()}")
        pytest.fail(f"slurm-up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}\n{logs}")
    try:
        yield Cluster(base, env)
    finally:
        subprocess.run(down, env=env, capture_output=True, timeout=120)


def _tiny_overrides(world, run_dir: Path) -> list[str]:
    return [f"model.path={world.sft_dir}", f"data.path={world.train_path}", f"logging.output_dir={run_dir}",
            "logging.progress=false", "logging.log_every=1"]


def test_smoke_cpu_two_nodes(slurm_cluster, tiny_world):
    """slurm/smoke_cpu.sbatch: 2 nodes x 1 task, tiny demo world, `sbatch --wait` returns the job's code."""
    c = slurm_cluster
    smoke, out = c.base / "smoke", c.base / "smoke.out"
    env = c.job_env(SMOKE_DIR=str(smoke), SMOKE_WORLD=str(tiny_world.root))
    try:
        proc = c.sbatch("smoke_cpu.sbatch", out=out, wait=True, timeout=420, env=env)
    except subprocess.TimeoutExpired:
        c.run("scancel", "--full", "-n", "sparsepo-smoke", check=False)
        raise AssertionError(f"smoke job did not finish in 7 minutes\n--- {out}\n{_tail(out)}\n{c.daemon_logs()}")
    jid = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "?"
    log = f"--- sbatch\n{proc.stdout}{proc.stderr}\n--- job log {out}\n{_tail(out)}\n{c.daemon_logs()}"
    assert proc.returncode == 0, f"smoke job {jid} exited {proc.returncode}\n{log}"
    info = c.job(jid)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{log}"
    assert info.get("NodeList") == "node[1-2]", info
    text = out.read_text()
    assert "slurm launch: world of 2, master node1:" in text, log
    assert "smoke test passed" in text, log
    summary = json.loads((smoke / "run" / "summary.json").read_text())
    assert summary["steps"] == 6, summary
    assert summary.get("world_size", 2) == 2, summary
    assert (smoke / "run" / "final" / "config.json").is_file(), log
    assert list((smoke / "run" / "final").glob("*.safetensors")), log


def test_precompute_own_allocation(slurm_cluster, tiny_world):
    """slurm/precompute.sbatch on one node x 2 tasks: fills the reference cache and trains nothing."""
    c = slurm_cluster
    run, out = c.base / "precompute", c.base / "precompute.out"
    proc = c.sbatch("precompute.sbatch", str(RECIPE), *_tiny_overrides(tiny_world, run), out=out,
                    options=("--nodes=1", "--ntasks-per-node=2"))
    assert proc.returncode == 0, f"sbatch failed: {proc.stdout}{proc.stderr}"
    jid = proc.stdout.strip()
    info = c.wait_job(jid, lambda i: i.get("JobState") in TERMINAL, timeout=300, what="precompute finishing", log=out)
    log = f"--- job log {out}\n{_tail(out)}\n{c.daemon_logs()}"
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{log}"
    assert "slurm launch: world of 2" in out.read_text(), log
    assert (run / "ref_cache" / "index.json").is_file(), log
    assert not (run / "summary.json").exists() and not (run / "checkpoints").exists(), sorted(run.iterdir())


def _preempted_step(text: str) -> int:
    for line in text.splitlines():
        if "preempted at step" in line:
            return int(line.split("preempted at step")[1].split(":")[0])
    raise AssertionError("no 'preempted at step N' line in the job log")


@pytest.mark.slow  # default-time budget (2026-12-05: the default run was 18 min on an idle box); the Slurm smoke runs by default, preemption resume: test_checkpoint.py
def test_preemption_requeue_resume_matches_uninterrupted(slurm_cluster, tiny_world):
    """train_multinode.sbatch: USR1 to the batch shell (what `--signal=B:USR1@120` delivers before the
    time limit) -> every rank checkpoints and exits 3 -> the script requeues the job -> the rerun
    (SLURM_RESTART_COUNT=1) resumes with --resume auto -> final loss = an uninterrupted run's."""
    c = slurm_cluster
    steps, every = 100, 5
    run, out = c.base / "preempt", c.base / "preempt.out"
    overrides = _tiny_overrides(tiny_world, run) + [f"train.max_steps={steps}", f"checkpoint.every_steps={every}"]
    proc = c.sbatch("train_multinode.sbatch", str(RECIPE), *overrides, out=out)
    assert proc.returncode == 0, f"sbatch failed: {proc.stdout}{proc.stderr}"
    jid = proc.stdout.strip()
    try:
        # training has started once the first checkpoint is complete ("latest" is written last)
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "latest").exists():
            info = c.job(jid)
            if info.get("JobState") in TERMINAL or time.monotonic() > deadline:
                raise AssertionError(f"job {jid} never wrote a checkpoint (state {info.get('JobState')})\n"
                                     f"--- job log {out}\n{_tail(out)}\n{c.daemon_logs()}")
            time.sleep(0.2)
        assert not (run / "summary.json").exists(), "the run finished before it could be preempted: raise max_steps"
        c.run("scancel", "--batch", "--signal=USR1", jid)
        first = c.wait_job(jid, lambda i: i.get("Restarts", "0") != "0", timeout=120, what="requeue", log=out)
        final = c.wait_job(jid, lambda i: i.get("JobState") in TERMINAL and i.get("Restarts") != "0",
                           timeout=300, what="the requeued run finishing", log=out)
    except BaseException:
        c.cancel(jid)
        raise
    text = out.read_text()
    log = f"--- job log {out}\n{_tail(out, 120)}\n{c.daemon_logs()}"
    assert final.get("JobState") == "COMPLETED" and final.get("ExitCode") == "0:0", f"{final}\n{log}"
    assert final.get("Restarts") == "1", f"{first}\n{final}\n{log}"
    # the first run: signal forwarded, checkpoint at the preempted step, exit 3, requeue
    assert "batch shell got USR1: forwarding to the step" in text, log
    stopped = _preempted_step(text)
    assert every <= stopped < steps, log
    assert "training step exited with 3" in text and f"scontrol requeue {jid}" in text, log
    # the second run: SLURM_RESTART_COUNT=1 -> --resume auto -> continues after the preempted step
    assert "SLURM_RESTART_COUNT=1" in text and "continuing the run: --resume auto" in text, log
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped:08d}'}" in text, log
    assert f"continuing at step {stopped}" in text, log
    rows = c.jobcomp(jid)
    # jobcomp: one record for the requeued run (not COMPLETED), one for the run that finished.
    # (Its DerivedExitCode races with the requeue: the step's 3 may not have reached slurmctld yet.)
    states = [r.get("JobState") for r in rows]
    assert len(rows) == 2 and states[-1] == "COMPLETED" and states[0] != "COMPLETED", rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps

    # the same config, never interrupted: one mpirun world of 2 (same global batch), no Slurm
    ref = c.base / "uninterrupted"
    env = {k: v for k, v in c.job_env().items() if k != "SLURM_CONF"}
    env.update(MASTER_PORT=str(free_port()), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if shutil.which("mpirun") is None:
        pytest.skip("needs Open MPI's mpirun for the uninterrupted reference run")
    cmd = ["mpirun", "--oversubscribe", "-np", "2", "bash", str(REPO / "launcher" / "launch.sh"), "--",
           "--config", str(RECIPE), *_tiny_overrides(tiny_world, ref), f"train.max_steps={steps}",
           "checkpoint.every_steps=0"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"uninterrupted run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    expected = json.loads((ref / "summary.json").read_text())
    assert abs(summary["final"]["loss"] - expected["final"]["loss"]) <= 1e-6, (summary["final"], expected["final"])
    got, want = read_scalars(run, "train/loss"), read_scalars(ref, "train/loss")
    if got and want:  # the whole curve, not just the last step
        assert sorted(got) == sorted(want) == list(range(1, steps + 1)), (sorted(got), sorted(want))
        worst = max(abs(got[s] - want[s]) for s in want)
        assert worst <= 1e-6, f"loss curves differ by up to {worst}"


@pytest.mark.slow  # 20 s; SIGUSR1 in the default run: tests/test_live_faults.py, test_checkpoint.py
def test_time_limit_warning_requeues_and_cancel_does_not(slurm_cluster):
    """The real `--signal=B:USR1@T` path (with the fast stand-in trainer): a 1-minute job gets Slurm's
    own USR1 warning 40 s before its limit, checkpoints, exits 3 and is requeued; a plain `scancel`
    (SIGTERM) of the rerun still checkpoints but is never requeued."""
    c = slurm_cluster
    run, out = c.base / "standin", c.base / "standin.out"
    env = c.job_env(SPARSEPO_ENTRY=str(STANDIN))
    proc = c.sbatch("train_multinode.sbatch", "none", f"logging.output_dir={run}", "train.max_steps=3000",
                    "standin.step_s=0.05", "checkpoint.every_steps=50", out=out, env=env,
                    options=("--time=1", "--signal=B:USR1@40"))
    assert proc.returncode == 0, f"sbatch failed: {proc.stdout}{proc.stderr}"
    jid = proc.stdout.strip()
    try:
        # Slurm sends the warning 40 s before the 60 s limit (up to a minute early): within ~60 s
        c.wait_job(jid, lambda i: i.get("Restarts", "0") != "0" and i.get("JobState") == "RUNNING"
                   and "resumed from" in out.read_text(), timeout=150, what="time-limit warning -> requeue -> resume",
                   log=out)
        c.run("scancel", jid)
        c.wait_job(jid, lambda i: i.get("JobState") in TERMINAL, timeout=60, what="cancel", log=out)
        time.sleep(1)  # a wrongly requeued job would be PENDING again by now
        final = c.job(jid)
    except BaseException:
        c.cancel(jid)
        raise
    text = out.read_text()
    log = f"--- job log {out}\n{_tail(out)}"
    assert final.get("JobState") == "CANCELLED", f"{final}\n{log}"
    assert "batch shell got USR1: forwarding to the step" in text, log
    assert f"scontrol requeue {jid}" in text and "SLURM_RESTART_COUNT=1" in text, log
    assert "batch shell got TERM" in text and "not requeueing" in text, log
    assert text.count("preempted at step") >= 2, log   # the warning and the cancel both ended in a checkpoint
