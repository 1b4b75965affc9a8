"""Every command in the README's code blocks, run as written on the tiny demo world (shortened with
overrides: a tiny world, 2 steps, 2 ranks where it asks for 8), so that none fails as written. Commands
that cannot run here say why (the install is what CI runs before this suite; sbatch needs a cluster:
tests/test_slurm.py runs the templates on a real Slurm; GPU lines need CUDA). A README command this file
does not know fails the default test: a new command comes with its runner."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_env
from test_readme_commands import blocks

VENV_BIN = Path(sys.executable).parent
TINY = "--size tiny"  # the demo's world at test size
GPU = "needs CUDA (the GPU path; pytest -m gpu on a GPU machine)"

# README command (comment cut, whitespace collapsed) -> what this test runs ({bin}: the venv's bin, {run}:
# a run directory of the README's my_run.yaml on the tiny world), or why it cannot run here.
RUNNERS: dict[str, str | tuple[str]] = {
    "bash launcher/install.sh && .venv/bin/sparsepo demo": ("the install is what CI runs before this suite; "
                                                            "`sparsepo demo` runs below",),
    "bash launcher/test.sh": ("this suite itself",),
    ".venv/bin/sparsepo demo --method simpo": "{bin}/sparsepo demo --method simpo " + TINY + " train.max_steps=2",
    ".venv/bin/sparsepo demo --nproc 2": "{bin}/sparsepo demo --nproc 2 " + TINY + " train.max_steps=2",
    ".venv/bin/sparsepo demo --method spo": "{bin}/sparsepo demo --method spo " + TINY + " train.max_steps=2",
    ".venv/bin/sparsepo demo train.max_steps=20": "{bin}/sparsepo demo " + TINY + " train.max_steps=2",
    ".venv/bin/sparsepo eval --policy runs/demo/run-dpo/final --reference runs/demo/world/sft --prompts "
    "runs/demo/world/data/eval_prompts.jsonl": "{bin}/sparsepo eval --policy runs/demo/run-dpo/final --reference "
                                               "runs/demo/world/sft --prompts runs/demo/world/data/eval_prompts.jsonl",
    ".venv/bin/sparsepo config keys": "{bin}/sparsepo config keys",
    ".venv/bin/sparsepo config show --config my_run.yaml method.beta=0.05":
        "{bin}/sparsepo config show --config my_run.yaml method.beta=0.05",
    ".venv/bin/sparsepo train --config my_run.yaml --nproc 8": "{bin}/sparsepo train --config my_run.yaml --nproc 2 {run}",
    ".venv/bin/deepspeed --num_gpus 8 --module sparsepo.train --config my_run.yaml method.beta=0.05":
        "{bin}/deepspeed --num_gpus 2 --module sparsepo.train --config my_run.yaml method.beta=0.05 {run2}",
    ".venv/bin/sparsepo train --config my_run.yaml --resume auto":
        "{bin}/sparsepo train --config my_run.yaml --resume auto --nproc 2 {run} train.max_steps=3",
    ".venv/bin/tensorboard --logdir runs/my-dpo/tensorboard": "{bin}/tensorboard --version_tb",
    '.venv/bin/sparsepo train --config my_run.yaml eval.fraction=0.05 eval.every_steps=100 '
    'logging.report_to="[tensorboard, wandb]" optim.warmup_ratio=0.1 optim.warmup_steps=0':
        '{bin}/sparsepo train --config my_run.yaml eval.fraction=0.05 eval.every_steps=100 '
        'logging.report_to="[tensorboard, wandb]" optim.warmup_ratio=0.1 optim.warmup_steps=0 {run3}',
    ".venv/bin/deepspeed --num_gpus 4 --module sparsepo.train --config my_run.yaml reference.mode=live "
    "topology.reference_ranks=2 topology.pipeline_stages=2":
        "{bin}/deepspeed --num_gpus 4 --module sparsepo.train --config my_run.yaml reference.mode=live "
        "topology.reference_ranks=2 topology.pipeline_stages=2 {run4}",
    "REFERENCE_NODES=1 sbatch --nodes=4 slurm/train_multinode.sbatch my_run.yaml reference.mode=live":
        ("needs a Slurm cluster: tests/test_slurm.py runs the template on a real one",),
    "sbatch --nodes=2 slurm/precompute.sbatch my_run.yaml": ("needs a Slurm cluster: tests/test_slurm.py",),
    "sbatch slurm/smoke_cpu.sbatch": ("needs a Slurm cluster: tests/test_slurm.py",),
    "mpirun -np 4 .venv/bin/python -m sparsepo.train --config my_run.yaml":
        "mpirun --allow-run-as-root --oversubscribe -np 2 {bin}/python -m sparsepo.train --config my_run.yaml {run5}",
    "bash launcher/install.sh": ("the install is what CI runs before this suite",),
    "SPARSEPO_INSTALL_DRY_RUN=1 bash launcher/install.sh": "SPARSEPO_INSTALL_DRY_RUN=1 bash {repo}/launcher/install.sh",
    ".venv/bin/sparsepo train --config my_run.yaml train.precision=bf16 deepspeed.stage_file=one_gpu.json": (GPU,),
}


def readme_commands() -> list[str]:
    """The README's shell commands: continuations joined, comments and blank lines cut, spaces collapsed."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("  #")[0].split())
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_every_readme_command_has_a_runner():
    assert sorted(readme_commands()) == sorted(RUNNERS), set(readme_commands()) ^ set(RUNNERS)


def my_run_yaml(world, cwd: Path) -> Path:
    (recipe,) = [b for b in blocks("yaml") if b.startswith("# my_run.yaml")]
    path = cwd / "my_run.yaml"
    path.write_text(recipe)
    return path


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tiny_world, tmp_path):
    """In README order, in one working directory (the eval line reads what the demo lines wrote, the
    resume line continues the first training run)."""
    my_run_yaml(tiny_world, tmp_path)
    on_world = f"model.path={tiny_world.sft_dir} data.path={tiny_world.train_path} train.max_steps=2"
    runs = {f"run{k}": f"{on_world} logging.output_dir={tmp_path / f'runs/my-dpo{k}'}" for k in ("", 2, 3, 4, 5)}
    env = train_env() | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "WANDB_MODE": "offline"}
    failed = []
    for command in readme_commands():
        runner = RUNNERS[command]
        if isinstance(runner, tuple):
            continue
        line = runner.format(bin=VENV_BIN, repo=REPO, **runs)
        proc = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            failed.append(f"{command}\n  ran: {line}\n  rc {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    assert not failed, "\n\n".join(failed)
