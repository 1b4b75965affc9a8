#!/usr/bin/env bash
# Install sparsepo and everything it needs on a fresh Debian/Ubuntu machine, CPU or NVIDIA GPU:
#   bash launcher/install.sh            # -> .venv with sparsepo, torch, deepspeed, sae-lens, ...
# Debian packages (Open MPI for mpi4py / mpirun, numactl for deepspeed core binding, a C++
# toolchain for DeepSpeed's just-in-time ops) are installed when missing and we are root.
# VENV=path picks another virtualenv location.
# torch: on a CPU machine the CPU wheel of torch 2.13.0, pinned by constraints.txt so no dependency can
# swap in a CUDA build. On a GPU machine (nvidia-smi -L lists a GPU; SPARSEPO_DEVICE=cpu|gpu forces
# either): a CUDA torch >= 2.4 that $PYTHON already has is kept (the venv sees it through
# --system-site-packages and every install is pinned to it), else the CUDA build of torch 2.13.0 from
# TORCH_INDEX (default https://download.pytorch.org/whl/cu128). SPARSEPO_INSTALL_DRY_RUN=1 prints the plan.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

device=${SPARSEPO_DEVICE:-auto}
if [ "$device" = auto ]; then
  device=cpu
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then device=gpu; fi
fi
venv_flags=() torch_args=(torch==2.13.0) constraint="$PWD/constraints.txt"
if [ "$device" = gpu ]; then
  kept=$("$PYTHON" -c "import torch; v = torch.__version__.split('+')[0]; major, minor = map(int, v.split('.')[:2]); print(v if torch.cuda.is_available() and (major, minor) >= (2, 4) else '')" 2>/dev/null || true)
  constraint=$(mktemp)
  grep -v '^torch==' constraints.txt > "$constraint"
  if [ -n "$kept" ]; then
    echo "GPU machine: keeping the CUDA torch $kept that $PYTHON already has"
    venv_flags=(--system-site-packages) torch_args=()
    echo "torch==$kept" >> "$constraint"
  else
    echo "GPU machine: installing the CUDA build of torch 2.13.0 from ${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
    torch_args=(torch==2.13.0 --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}")
    echo "torch==2.13.0" >> "$constraint"
  fi
fi
if [ "${SPARSEPO_INSTALL_DRY_RUN:-0}" = 1 ]; then
  echo "plan: device=$device venv_flags=${venv_flags[*]:-} torch=${torch_args[*]:-kept} constraint=$(grep '^torch' "$constraint")"
  exit 0
fi

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

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv ${venv_flags[@]+"${venv_flags[@]}"} "$VENV"
export PIP_CONSTRAINT="$constraint" PIP_DISABLE_PIP_VERSION_CHECK=1
[ ${#torch_args[@]} -eq 0 ] || "$VENV/bin/pip" install -q "${torch_args[@]}"
"$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/python" -c "from sparsepo.lean_imports import bitsandbytes_offline; bitsandbytes_offline(); import torch, deepspeed, transformers, datasets, mpi4py, sae_lens; print('sparsepo installed: torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v "real_accelerator"
