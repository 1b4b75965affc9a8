#!/usr/bin/env bash
# One launch path for sparsepo training, on a laptop, under mpirun and under Slurm:
#
#   launcher/launch.sh [--nproc N] [--print-env] -- <sparsepo.train arguments>
#
#   launcher/launch.sh --nproc 2 -- --config sparsepo/recipes/demo.yaml train.max_steps=20
#   mpirun --allow-run-as-root -np 4 launcher/launch.sh -- --config run.yaml
#   srun launcher/launch.sh -- --config run.yaml --resume auto        # (see slurm/*.sbatch)
#
# What it does depends on where it runs, as `python -m sparsepo.launch --print-env` (the one parser
# of launcher variables, sparsepo/launch/environ.py) reads it; SPARSEPO_LAUNCH_MODE=slurm|mpi|local
# forces one:
#   slurm  inside an srun task (SLURM_PROCID and SLURM_STEP_ID set): RANK=SLURM_PROCID,
#          WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID, MASTER_ADDR=first host of the step's
#          node list, MASTER_PORT=20000+SLURM_JOB_ID%10000 (MASTER_ADDR / MASTER_PORT kept when
#          already set); then execs one trainer process.
#   mpi    under mpirun (OMPI_COMM_WORLD_RANK set): the same from OMPI_COMM_WORLD_*, MASTER_ADDR
#          127.0.0.1 unless set (multi-host mpirun: pass -x MASTER_ADDR=<first host>), MASTER_PORT
#          20000 + the mpirun job id % 10000 unless set (the port rule: sparsepo/launch/ports.py).
#   local  anything else (a shell, or a batch script without srun): N=1 -> one plain process,
#          N>1 -> `deepspeed --num_gpus N --module sparsepo.train` on this machine (MASTER_PORT, else
#          a free port).
# --nproc is ignored under slurm / mpi (the launcher there decides the number of processes).
#
# Environment (each only when unset): OMP_NUM_THREADS=1; DS_ACCELERATOR=cpu when there is no
# nvidia-smi; TORCH_EXTENSIONS_DIR=$SPARSEPO_CACHE_DIR/torch_extensions when SPARSEPO_CACHE_DIR is
# set (a shared file system: DeepSpeed's ops compiled once per cluster; otherwise torch's default
# ~/.cache/torch_extensions); TOKENIZERS_PARALLELISM=false.
# SPARSEPO_PYTHON: the interpreter (default `python`); point it at the venv, e.g.
#   export SPARSEPO_PYTHON=/path/to/sparsepo/.venv/bin/python
# (srun and a local mpirun pass the environment on to every task).
# SPARSEPO_ENTRY: what to run instead of the module sparsepo.train (a module name or a .py file).
# --print-env (or --dry-run): print the derived variables and the command, run nothing.
#
# Exit code: the trainer's (0 done, 1 error, 2 config error, 3 preempted: checkpoint written,
# resubmit / requeue with --resume auto). 64: bad launcher arguments.
set -euo pipefail
# shellcheck source=launcher/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }

nproc=${SPARSEPO_NPROC:-1}
print_env=0
while [ $# -gt 0 ]; do
  case $1 in
    --nproc) [ $# -ge 2 ] || { echo "launch.sh: --nproc needs a value" >&2; exit 64; }; nproc=$2; shift 2 ;;
    --nproc=*) nproc=${1#*=}; shift ;;
    --print-env|--dry-run) print_env=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option '$1' (trainer arguments go after --)" >&2; usage >&2; exit 64 ;;
  esac
done
case $nproc in ''|*[!0-9]*|0) echo "launch.sh: --nproc must be a positive integer, got '$nproc'" >&2; exit 64 ;; esac

sparsepo_common_env
PY=$(sparsepo_python)
entry=${SPARSEPO_ENTRY:-sparsepo.train}
sparsepo_launch_env || exit $?   # sets sparsepo_mode; exports RANK ... MASTER_PORT under slurm / mpi
mode=$sparsepo_mode

case $entry in
  *.py) run=("$PY" "$entry") ;;
  *)    run=("$PY" -m "$entry") ;;
esac

case $mode in
  slurm|mpi) cmd=("${run[@]}" "$@") ;;
  local)
    if [ "$nproc" -eq 1 ]; then
      cmd=("${run[@]}" "$@")
    else
      ds=("$PY" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_addr "$sparsepo_master_addr"
          --master_port "$sparsepo_master_port")
      if [ "${SPARSEPO_BIND_CORES:-0}" = 1 ]; then ds+=(--bind_cores_to_rank); fi
      case $entry in
        *.py) cmd=("${ds[@]}" "$entry" "$@") ;;
        *)    cmd=("${ds[@]}" --module "$entry" "$@") ;;
      esac
    fi ;;
  *) echo "launch.sh: SPARSEPO_LAUNCH_MODE must be slurm, mpi or local, not '$mode'" >&2; exit 64 ;;
esac

if [ "$print_env" = 1 ]; then
  echo "MODE=$mode"
  for v in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE MASTER_ADDR MASTER_PORT OMP_NUM_THREADS DS_ACCELERATOR TORCH_EXTENSIONS_DIR; do
    echo "$v=${!v:-}"
  done
  printf 'CMD='; printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

if [ "$mode" != local ] && [ "${RANK:-0}" = 0 ]; then
  sparsepo_log "$mode launch: world of $WORLD_SIZE, master $MASTER_ADDR:$MASTER_PORT, $PY"
fi
exec "${cmd[@]}"
