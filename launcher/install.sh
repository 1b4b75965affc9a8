#!/usr/bin/env bash
# Install sparsepo and everything it needs on a fresh Debian/Ubuntu machine:
#   bash launcher/install.sh            # -> .venv with sparsepo, torch (CPU), deepspeed, sae-lens, ...
# Debian packages (Open MPI for mpi4py / mpirun, numactl for deepspeed core binding, a C++
# toolchain for DeepSpeed's just-in-time ops) are installed when missing and we are root.
# VENV=path picks another virtualenv location. torch is pinned (constraints.txt) so no dependency
# can swap in a CUDA build; on a GPU machine install the CUDA torch 2.13.0 wheel first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

missing=""
command -v mpirun >/dev/null || missing="$missing openmpi-bin"
[ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h ] || [ -e /usr/include/mpi.h ] || command -v mpicc >/dev/null || missing="$missing libopenmpi-dev"
command -v numactl >/dev/null || missing="$missing numactl"
command -v g++ >/dev/null || missing="$missing g++"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "warning: missing system packages:$missing (install them with your package manager)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/python" -c "import torch, deepspeed, transformers, datasets, mpi4py, sae_lens; print('sparsepo installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v "real_accelerator"
