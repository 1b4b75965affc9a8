#!/usr/bin/env bash
# One lent GPU, one call: what issues 19 and 20 wait for, most important first, each part time-boxed so a
# call that runs out of time still returns what finished. Everything lands under $OUT (the device tool's
# folder): steps.txt (each part's exit status and seconds), the parts' logs and JSON.
#
#   bash benchmarks/gpu_session.sh                       # on the GPU machine, after carrying .whl/ (GPU.md)
#   BUDGET=540 PARTS=bench,head bash benchmarks/gpu_session.sh
#   GPU_SESSION_ALLOW_CPU=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh   # CPU smoke run of the logic (tiny preset)
#
# Parts, in order (PARTS picks some): bench = gpu_bench.sh's cache / trl-precompute / inline / trl-inline rows
# (issue 19's targets), head = bench_head.py (the lean head's own backward vs the checkpoint replay, time and
# peak memory), adapters = gpu_bench.sh's lora / qlora rows (issue 20), live = the live row, profile =
# profile_step.py (where a cached and an inline step spend device time, host syncs; Chrome traces), tests =
# pytest -m gpu. A part starts only while BUDGET (seconds, default 560) leaves at least its estimate.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
PY=${SPARSEPO_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
START=$(date +%s)
BUDGET=${BUDGET:-560}
PARTS=",${PARTS:-bench,head,adapters,live,profile,tests},"
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  PRESET=${PRESET:-issue19} DEVICE=cuda STEPS=${STEPS:-20}
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
elif [[ "${GPU_SESSION_ALLOW_CPU:-0}" == 1 ]]; then
  PRESET=tiny DEVICE=cpu STEPS=${STEPS:-3}
  export GPU_BENCH_ALLOW_CPU=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  echo "cpu smoke run" > "$OUT/device.txt"
else
  echo "gpu_session: no NVIDIA GPU; GPU_SESSION_ALLOW_CPU=1 for a CPU smoke run" >&2
  exit 1
fi
# wheels the machine lacks (GPU.md), installed once beside its torch for every part
source benchmarks/use_wheels.sh

part() {  # part NAME ESTIMATE_S COMMAND...: run it if wanted and the budget allows, time-boxed, logged
  local name=$1 estimate=$2; shift 2
  [[ "$PARTS" == *",$name,"* ]] || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < estimate )); then
    echo "$name skipped: ${left}s left, needs ~${estimate}s" | tee -a "$OUT/steps.txt"
    return 0
  fi
  local t0=$(date +%s)
  timeout "$left" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
}

bench() {  # bench PART MODES: the gpu_bench.sh command for those rows, into $OUT/gpu_bench-PART.json; the parts
  # share $OUT/bench (one model built, one reference cache; OUT must not hold spaces)
  echo env OUT="$OUT/bench" JSON="$OUT/gpu_bench-$1.json" MD=none MODES="$2" PRESET="$PRESET" STEPS="$STEPS" \
    bash benchmarks/gpu_bench.sh
}

part bench 200 $(bench core cache,trl-precompute,inline,trl-inline)
part head 40 "$PY" benchmarks/bench_head.py --device "$DEVICE" --dtype bf16 --repeats 3 --json "$OUT/bench_head.json"
part adapters 100 $(bench adapters lora,qlora)
part live 60 $(bench live live)
part profile 100 "$PY" benchmarks/profile_step.py --preset "$PRESET" --precision bf16 --out "$OUT/profile" --trace \
  --override deepspeed.stage_file=one_gpu.json
part tests 60 "$PY" -m pytest -q -m gpu tests/test_gpu.py tests/test_logprobs_chunked.py
echo "done in $(( $(date +%s) - START ))s" | tee -a "$OUT/steps.txt"
