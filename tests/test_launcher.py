"""launcher/launch.sh and launcher/env.sh without Slurm: the environment each launch mode derives
(`--print-env`), the sbatch templates' commands (SPARSEPO_DRY_RUN=1), the batch shell's signal
forwarding, and a real 2-rank training run under mpirun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, RECIPE, free_port

LAUNCH = REPO / "launcher" / "launch.sh"
ENV_SH = REPO / "launcher" / "env.sh"
STANDIN = REPO / "tests" / "slurm" / "standin_train.py"
# Variables a surrounding launcher (a Slurm job running pytest, mpirun, torchrun) would leak in.
_LEAKY = ("SLURM_", "OMPI_", "PMIX_", "PMI_")
_DIST = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "SPARSEPO_LAUNCH_MODE",
         "SPARSEPO_ENTRY", "SPARSEPO_NPROC", "SPARSEPO_DRY_RUN", "SPARSEPO_RESUME", "REFERENCE_NODES",
         "TORCH_EXTENSIONS_DIR", "SPARSEPO_CACHE_DIR", "SPARSEPO_ROOT", "OMP_NUM_THREADS", "DS_ACCELERATOR"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY) and k not in _DIST}
    env["SPARSEPO_PYTHON"] = sys.executable
    env.update(extra)
    return env


def print_env(*args: str, env: dict[str, str], nproc: int | None = None) -> dict[str, str]:
    cmd = ["bash", str(LAUNCH), *(["--nproc", str(nproc)] if nproc else []), "--print-env", "--", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def fake_scontrol(tmp_path: Path, body: str) -> str:
    """A PATH with a stand-in `scontrol` first (the real one needs a slurm.conf)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "scontrol"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}"


SLURM_TASK = dict(SLURM_PROCID="3", SLURM_STEP_ID="0", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_NODEID="1",
                  SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_STEP_TASKS_PER_NODE="2(x2)")


def test_slurm_task_env_parsed_by_python_not_scontrol(tmp_path):
    """The node list is read by sparsepo.launch (the one parser), not by `scontrol show hostnames`:
    a stand-in scontrol that would answer differently is never asked."""
    asked = tmp_path / "scontrol-was-asked"
    path = fake_scontrol(tmp_path, f'touch {asked}; echo first-of-"$3"; echo second')
    env = print_env("--config", "run.yaml", "method.beta=0.2", env=clean_env(PATH=path, **SLURM_TASK))
    assert env["MODE"] == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("3", "4", "1", "2")
    assert env["MASTER_ADDR"] == "gpu07" and not asked.exists()
    assert env["MASTER_PORT"] == str(20000 + 123456 % 10000)
    assert env["CMD"].split() == [sys.executable, "-m", "sparsepo.train", "--config", "run.yaml", "method.beta=0.2"]


def test_slurm_task_env_without_scontrol(tmp_path):
    """No working scontrol (e.g. no slurm.conf on this host): nothing changes, Python reads the node list."""
    path = fake_scontrol(tmp_path, "exit 1")
    for nodelist, first in [("gpu[07-08]", "gpu07"), ("a[003,1-2],b1", "a003"), ("n1,n2", "n1"),
                            ("rack[1-2]-n[5-6]", "rack1-n5"), ("solo", "solo")]:
        env = print_env(env=clean_env(PATH=path, **{**SLURM_TASK, "SLURM_JOB_NODELIST": nodelist}))
        assert env["MASTER_ADDR"] == first, nodelist


def test_slurm_task_keeps_preset_master(tmp_path):
    path = fake_scontrol(tmp_path, "exit 1")
    env = print_env(env=clean_env(PATH=path, MASTER_ADDR="10.0.0.5", MASTER_PORT="31337", **SLURM_TASK))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "31337")


def test_batch_shell_without_srun_is_local():
    """The batch shell has SLURM_PROCID=0 but no job step: launch.sh there is a local launch."""
    env = print_env(env=clean_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_ID="7"), nproc=2)
    assert env["MODE"] == "local"
    assert "deepspeed.launcher.runner --num_gpus 2" in env["CMD"]


def test_mpi_env():
    env = print_env("--config", "c.yaml", env=clean_env(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2",
                                                        OMPI_COMM_WORLD_LOCAL_RANK="1",
                                                        OMPI_COMM_WORLD_LOCAL_SIZE="2",
                                                        OMPI_MCA_ess_base_jobid="1082982401"))
    assert env["MODE"] == "mpi"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("1", "2", "1", "2")
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["MASTER_PORT"] == str(20000 + 1082982401 % 10000)
    assert env["CMD"].split() == [sys.executable, "-m", "sparsepo.train", "--config", "c.yaml"]


def test_mpi_wins_over_slurm_batch_vars():
    """mpirun inside an allocation: the OMPI variables decide, not the batch shell's SLURM_PROCID."""
    env = print_env(env=clean_env(SLURM_PROCID="0", SLURM_STEP_ID="0", SLURM_NTASKS="1",
                                  OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2"))
    assert (env["MODE"], env["RANK"], env["WORLD_SIZE"]) == ("mpi", "1", "2")


def test_local_env_and_defaults():
    env = print_env("--config", "c.yaml", env=clean_env())
    assert env["MODE"] == "local"
    assert env["CMD"].split() == [sys.executable, "-m", "sparsepo.train", "--config", "c.yaml"]
    assert env["OMP_NUM_THREADS"] == "1"
    assert env.get("TORCH_EXTENSIONS_DIR", "") == ""  # torch's default cache unless SPARSEPO_CACHE_DIR
    shared = print_env(env=clean_env(SPARSEPO_CACHE_DIR="/shared/sparsepo"))
    assert shared["TORCH_EXTENSIONS_DIR"] == "/shared/sparsepo/torch_extensions"
    if shutil.which("nvidia-smi") is None:
        assert env["DS_ACCELERATOR"] == "cpu"
    two = print_env("--config", "c.yaml", "x.y=1", env=clean_env(MASTER_PORT="29999"), nproc=2)
    assert two["CMD"].split() == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                                  "--master_addr", "127.0.0.1", "--master_port", "29999", "--module",
                                  "sparsepo.train", "--config", "c.yaml", "x.y=1"]
    kept = print_env(env=clean_env(OMP_NUM_THREADS="4", TORCH_EXTENSIONS_DIR="/x/ext", DS_ACCELERATOR="cuda",
                                   SPARSEPO_ENTRY="my_entry.py"))
    assert (kept["OMP_NUM_THREADS"], kept["TORCH_EXTENSIONS_DIR"], kept["DS_ACCELERATOR"]) == ("4", "/x/ext", "cuda")
    assert kept["CMD"].split() == [sys.executable, "my_entry.py"]


@pytest.mark.parametrize("args", [["--bogus"], ["--nproc", "0"], ["--nproc"]])
def test_bad_launcher_arguments(args):
    proc = subprocess.run(["bash", str(LAUNCH), *args], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64, proc.stderr


def bash_env_sh(script: str, env: dict[str, str], timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {ENV_SH}; {script}"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_helpers_tasks_per_node():
    out = bash_env_sh('for a in "2(x3),1 0" "2(x3),1 3" "4 0" "3,2 1"; do set -- $a; '
                      'printf "%s " "$(sparsepo_tasks_on_node $1 $2)"; done', clean_env())
    assert out.stdout.split() == ["2", "1", "4", "2"], out.stderr
    out = bash_env_sh('sparsepo_tasks_on_node "2(x3),1" 4', clean_env())
    assert out.returncode == 64 and "lists 4 node(s)" in out.stderr


def test_launch_env_is_read_by_python():
    """env.sh's sparsepo_launch_env evals what `python -m sparsepo.launch --print-env` prints."""
    out = bash_env_sh('sparsepo_launch_env; echo "$sparsepo_mode $RANK $WORLD_SIZE $LOCAL_SIZE $MASTER_ADDR $MASTER_PORT"',
                      clean_env(**{**SLURM_TASK, "SLURM_STEP_NODELIST": "node[01-03,07],gpu-a[1-2]"}))
    assert out.stdout.split() == ["slurm", "3", "4", "2", "node01", str(20000 + 123456 % 10000)], out.stderr
    out = bash_env_sh("sparsepo_launch_env", clean_env(SPARSEPO_LAUNCH_MODE="pbs"))
    assert out.returncode == 64 and "SPARSEPO_LAUNCH_MODE must be one of" in out.stderr


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_resume_args(tmp_path):
    run = tmp_path / "run"
    cfg = f"--config {RECIPE} logging.output_dir={run}"
    env = clean_env()

    def resume(extra: str = "", **e: str) -> str:
        proc = bash_env_sh(f"sparsepo_resume_args {cfg} {extra}", {**env, **e})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert resume() == ""                                    # fresh run
    assert resume(SLURM_RESTART_COUNT="1") == "--resume auto"  # requeued job
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    assert resume() == "--resume auto"                       # a run directory with checkpoints
    assert resume("--resume /some/ckpt") == ""               # the caller already chose
    assert resume(SPARSEPO_RESUME="never") == ""
    # output_dir from the config file (no override): resolved by sparsepo.config
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"logging:\n  output_dir: {run}\n")
    proc = bash_env_sh(f"sparsepo_resume_args --config {cfg_file}", env)
    assert proc.stdout.strip() == "--resume auto", proc.stderr


def test_requeue_decision():
    env = clean_env(SPARSEPO_DRY_RUN="1", SLURM_JOB_ID="42")
    proc = bash_env_sh("sparsepo_requeue_on_preempt 3", env)
    assert proc.returncode == 0 and "DRY-RUN: scontrol requeue 42" in proc.stdout, proc.stderr
    # killed by the USR1 the batch shell forwarded, before the trainer listened for it: requeue too
    proc = bash_env_sh("SPARSEPO_GOT_USR1=1; sparsepo_requeue_on_preempt 138", env)
    assert proc.returncode == 0 and "DRY-RUN: scontrol requeue 42" in proc.stdout, proc.stderr
    for script in ("sparsepo_requeue_on_preempt 0", "sparsepo_requeue_on_preempt 1",
                   "sparsepo_requeue_on_preempt 138", "SPARSEPO_GOT_TERM=1; sparsepo_requeue_on_preempt 3"):
        proc = bash_env_sh(f"if {script}; then echo REQUEUED; fi", env)
        assert "REQUEUED" not in proc.stdout and "scontrol requeue" not in proc.stdout, script


def test_run_step_forwards_usr1_and_returns_child_code(tmp_path):
    """What the batch shell does under `--signal=B:USR1@T`: a USR1 to the shell reaches the step,
    and the step's own exit code (3, preempted) comes back - not the shell's 128+signal."""
    ready = tmp_path / "ready"
    child = (f"import signal, sys, time, pathlib\n"
             f"got = []\n"
             f"signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
             f"pathlib.Path({str(ready)!r}).write_text('x')\n"
             f"t = time.time()\n"
             f"while not got and time.time() - t < 30: time.sleep(0.05)\n"
             f"time.sleep(0.3)\n"  # 'finishing the step' after the signal
             f"sys.exit(3 if got else 9)\n")
    (tmp_path / "child.py").write_text(child)
    script = (f"rc=0; sparsepo_run_step {sys.executable} {tmp_path / 'child.py'} || rc=$?; "
              f"echo RC=$rc GOT_USR1=$SPARSEPO_GOT_USR1")
    proc = subprocess.Popen(["bash", "-c", f"set -euo pipefail; source {ENV_SH}; {script}"], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    if not ready.exists():
        proc.kill()
        pytest.fail(f"the child never started: {proc.communicate()}")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert "RC=3 GOT_USR1=1" in out, out + err
    assert "forwarding to the step" in err


def test_run_step_after_an_early_warning_does_not_start():
    """A USR1 before the step starts (while the batch script prepares) is remembered, not fatal:
    the step is skipped and reported as preempted, so the job is requeued."""
    script = ('sparsepo_trap_preemption; kill -USR1 $$; rc=0; sparsepo_run_step touch /nonexistent/x || rc=$?; '
              'echo RC=$rc; SLURM_JOB_ID=42 SPARSEPO_DRY_RUN=1 sparsepo_requeue_on_preempt $rc')
    proc = bash_env_sh(script, clean_env())
    assert "RC=3" in proc.stdout and "DRY-RUN: scontrol requeue 42" in proc.stdout, proc.stdout + proc.stderr
    assert "not starting it" in proc.stderr


def sbatch_dry_run(template: str, *args: str, **extra: str) -> str:
    env = clean_env(SPARSEPO_DRY_RUN="1", **extra)
    proc = subprocess.run(["bash", str(REPO / "slurm" / template), *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, f"{template}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DRY-RUN:")]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_sbatch_templates_commands(tmp_path):
    launch = f"{REPO}/launcher/launch.sh --"
    out = sbatch_dry_run("train_multinode.sbatch", "run.yaml", f"logging.output_dir={tmp_path}", "x.y=1")
    assert out == f"DRY-RUN: srun --kill-on-bad-exit=0 --wait=120 {launch} --config run.yaml " \
                  f"logging.output_dir={tmp_path} x.y=1"
    out = sbatch_dry_run("train_multinode.sbatch", "run.yaml", f"logging.output_dir={tmp_path}",
                         SLURM_RESTART_COUNT="1", REFERENCE_NODES="1", SLURM_TASKS_PER_NODE="2(x3)",
                         SPARSEPO_SRUN_ARGS="--mpi=pmix")
    assert out == f"DRY-RUN: srun --kill-on-bad-exit=0 --wait=120 --mpi=pmix {launch} --config run.yaml " \
                  f"--resume auto logging.output_dir={tmp_path} topology.reference_ranks=2"
    out = sbatch_dry_run("precompute.sbatch", "run.yaml", "a.b=2")
    assert out == f"DRY-RUN: srun --kill-on-bad-exit=1 {launch} --config run.yaml a.b=2 reference.mode=precompute"
    out = sbatch_dry_run("smoke_cpu.sbatch", "method.name=ipo", SMOKE_DIR=str(tmp_path / "smoke"))
    assert f"{launch} --config {REPO}/sparsepo/recipes/demo.yaml model.path={tmp_path}/smoke/world/sft" in out
    assert f"logging.output_dir={tmp_path}/smoke/run" in out and out.endswith("method.name=ipo")


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")
def test_mpirun_standin_sees_rank_env(tmp_path):
    """Each mpirun rank gets RANK / LOCAL_RANK / MASTER_* from launch.sh and joins one gloo world."""
    out = tmp_path / "standin"
    env = clean_env(SPARSEPO_ENTRY=str(STANDIN), MASTER_PORT=str(free_port()), OMPI_ALLOW_RUN_AS_ROOT="1",
                    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", "bash", str(LAUNCH), "--",
                           f"logging.output_dir={out}", "train.max_steps=3"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    for r in (0, 1):
        seen = json.loads((out / f"rank{r}.json").read_text())
        assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"], seen["world"]) == (str(r), str(r), "2", 2)
        assert (seen["MASTER_ADDR"], seen["OMP_NUM_THREADS"]) == ("127.0.0.1", "1")
    assert json.loads((out / "summary.json").read_text())["world"] == 2


@pytest.mark.distributed
@pytest.mark.slow  # 47 s; mpirun in the default run: tests/test_live.py::test_mpirun_launch
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")
def test_mpirun_tiny_training_run(tiny_world, tmp_path):
    """A real 2-rank ZeRO-3 run through `mpirun ... launcher/launch.sh`: both ranks train and checkpoint."""
    run = tmp_path / "run"
    env = clean_env(MASTER_PORT=str(free_port()), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    TORCH_EXTENSIONS_DIR=torch_extensions_dir())
    cmd = ["mpirun", "--oversubscribe", "-np", "2", "bash", str(LAUNCH), "--", "--config", str(RECIPE),
           f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}", f"logging.output_dir={run}",
           "train.max_steps=6", "checkpoint.every_steps=2", "logging.progress=false", "logging.log_every=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    log = f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert "mpi launch: world of 2" in proc.stderr, log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary.get("world_size", 2) == 2, summary
    assert (run / "final" / "config.json").is_file()
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-00000006"
    assert (latest / "rng-rank0.pt").is_file() and (latest / "rng-rank1.pt").is_file(), sorted(latest.iterdir())


def torch_extensions_dir() -> str:
    """The JIT-ops cache the other tests use (torch's default), so DeepSpeed's ops compile once."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions")
