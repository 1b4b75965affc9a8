"""launcher/install.sh's choice of torch (SPARSEPO_INSTALL_DRY_RUN=1 prints it, installs nothing):
CPU machine -> the pinned CPU wheel; GPU machine -> keep a CUDA torch the machine has, else the CUDA build."""

import os
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit


def plan(tmp_path, *, gpu: bool, torch_cuda: str | None) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-x)'\n" if gpu else "#!/bin/sh\nexit 9\n")
    py = bin_dir / "fakepython"  # stands for a system python whose torch does (or does not) see CUDA
    py.write_text("#!/bin/sh\n" + (f"echo {torch_cuda}\n" if torch_cuda else "echo\n"))
    for f in (smi, py):
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(py), SPARSEPO_INSTALL_DRY_RUN="1")
    env.pop("SPARSEPO_DEVICE", None)
    out = subprocess.run(["bash", str(REPO / "launcher" / "install.sh")], env=env, capture_output=True, text=True,
                         check=True).stdout
    return out.strip().splitlines()[-1]


def test_cpu_machine_gets_the_pinned_cpu_wheel(tmp_path):
    assert plan(tmp_path, gpu=False, torch_cuda=None) == \
        "plan: device=cpu venv_flags= torch=torch==2.13.0 constraint=torch==2.13.0"


def test_gpu_machine_keeps_its_cuda_torch(tmp_path):
    assert plan(tmp_path, gpu=True, torch_cuda="2.11.0") == \
        "plan: device=gpu venv_flags=--system-site-packages torch=kept constraint=torch==2.11.0"


def test_gpu_machine_without_a_cuda_torch_takes_the_cuda_build(tmp_path):
    got = plan(tmp_path, gpu=True, torch_cuda=None)
    assert "device=gpu" in got and "--index-url https://download.pytorch.org/whl/cu" in got and \
        got.endswith("constraint=torch==2.13.0")
