#!/usr/bin/env bash
# sparsepo (cache, inline, live) against TRL's DPOTrainer (precompute_ref_log_probs, inline) on the GPU issue's
# workload (a 0.94 B Llama, 8 pairs of 128 + 384 tokens a step, bf16, 30 steps, median of 6-30), on all GPUs
# (1 included: live mode then puts the policy and the reference on GPU 0 by topology.device_map=0,0).
# Writes docs/gpu_bench.json and the table in docs/benchmarks.md (benchmarks/gpu_bench.py does the work).
#
#   benchmarks/gpu_bench.sh                                  # everything, issue 19's workload
#   MODES=cache,trl-precompute STEPS=20 benchmarks/gpu_bench.sh
#   GPU_BENCH_ALLOW_CPU=1 PRESET=tiny OUT=/tmp/gb JSON=/tmp/gb/g.json MD=none benchmarks/gpu_bench.sh   # CPU smoke
#
# Environment: SPARSEPO_PYTHON (default .venv/bin/python, else python3), PRESET (issue19), MODES
# (cache,inline,live,trl-precompute,trl-inline,lora,qlora), STEPS (the preset's), OUT (runs/gpu-bench), JSON, MD,
# TRL_PYTHON (an interpreter that imports trl; default the same one). Packages the machine lacks (deepspeed,
# datasets, trl, ... as wheels in .whl/, ../shared/GPU.md) are installed into a temporary directory first.
# Nothing here writes a checkpoint (checkpoint.at_end=false); each run's log is in $OUT/<run>.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${SPARSEPO_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/gpu-bench}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  unset DS_ACCELERATOR  # sparsepo sets it to cpu only when CUDA is absent
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
elif [[ "${GPU_BENCH_ALLOW_CPU:-0}" == 1 ]]; then
  echo "gpu_bench: no GPU; running on CPU (GPU_BENCH_ALLOW_CPU=1: a smoke run of the script's logic)"
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
else
  echo "gpu_bench: no NVIDIA GPU (nvidia-smi -L failed); set GPU_BENCH_ALLOW_CPU=1 for a CPU smoke run" >&2
  exit 1
fi

# wheels carried to a machine without network (../shared/GPU.md): installed beside, never over, its torch
source benchmarks/use_wheels.sh
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v real_accelerator

ARGS=(--preset "${PRESET:-issue19}" --out "$OUT" --modes "${MODES:-cache,inline,live,trl-precompute,trl-inline,lora,qlora}"
      --trl-python "${TRL_PYTHON:-$PY}" --json "${JSON:-docs/gpu_bench.json}" --md "${MD:-docs/benchmarks.md}")
[[ -n "${STEPS:-}" ]] && ARGS+=(--steps "$STEPS")
exec "$PY" benchmarks/gpu_bench.py "${ARGS[@]}" "$@"
