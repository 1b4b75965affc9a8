# shellcheck shell=bash
# Launch helpers for sparsepo, shared by launcher/launch.sh and the sbatch templates in slurm/.
# Only what a shell must do lives here: choosing the interpreter, the batch shell's signal handling
# and requeue, building the command. Launcher variables (ranks, hosts, ports) are read by Python
# (sparsepo/launch/), never parsed here.
#
#   source launcher/env.sh            # defines the functions below; runs nothing, sets SPARSEPO_ROOT
#
# Functions (all safe under `set -euo pipefail`):
#   sparsepo_python                   the interpreter: $SPARSEPO_PYTHON, else `python`, else `python3`.
#                                     Point SPARSEPO_PYTHON at the venv: SPARSEPO_PYTHON=$PWD/.venv/bin/python
#   sparsepo_common_env               exports OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu (when there is no
#                                     nvidia-smi), TORCH_EXTENSIONS_DIR (shared JIT-ops cache),
#                                     TOKENIZERS_PARALLELISM=false, PYTHONUNBUFFERED=1 - each only if unset
#   sparsepo_launch_env               asks Python what this process is (`python -m sparsepo.launch
#                                     --print-env`, the one parser of launcher variables): sets
#                                     sparsepo_mode (slurm | mpi | local; SPARSEPO_LAUNCH_MODE forces
#                                     one); under slurm / mpi exports RANK, WORLD_SIZE, LOCAL_RANK,
#                                     LOCAL_WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT; under local
#                                     sets sparsepo_master_addr / sparsepo_master_port for the launch
#                                     the shell starts itself (MASTER_* when set, else a free port)
#   sparsepo_tasks_on_node SPEC N     tasks on node N of a Slurm tasks-per-node list ("2(x3),1" 3 -> 1)
#   sparsepo_output_dir ARGS...       logging.output_dir of `--config C [overrides]` (resolved by sparsepo.config)
#   sparsepo_resume_args ARGS...      prints `--resume auto` when the job was requeued
#                                     (SLURM_RESTART_COUNT > 0) or the run directory holds checkpoints
#   sparsepo_trap_preemption          batch shell: remember USR1 / TERM instead of dying (call it early)
#   sparsepo_run_step CMD...          runs CMD (srun ...) in the background and waits for it, forwarding
#                                     USR1 (preemption warning, `--signal=B:USR1@T`) and TERM to it;
#                                     returns its exit code (3 without running it after an early USR1)
#   sparsepo_requeue_on_preempt RC    RC == 3 (trainer: checkpoint written after a preemption signal),
#                                     or 138 after a USR1 we forwarded (killed while starting up)
#                                     -> `scontrol requeue $SLURM_JOB_ID`; not after a SIGTERM to the
#                                     batch shell (scancel / Slurm's own preemption already decided)
#   sparsepo_job_banner               one log line with the job's id, nodes, tasks and restart count

SPARSEPO_EXIT_PREEMPTED=3

if [ -z "${SPARSEPO_ROOT:-}" ]; then
  SPARSEPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
export SPARSEPO_ROOT

sparsepo_log() { echo "[sparsepo-launch $(date +%H:%M:%S)] $*" >&2; }

sparsepo_python() {
  if [ -n "${SPARSEPO_PYTHON:-}" ]; then echo "$SPARSEPO_PYTHON"
  elif command -v python >/dev/null 2>&1; then echo python
  else echo python3
  fi
}

sparsepo_common_env() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu
  fi
  # DeepSpeed compiles its ops (fused_adam, cpu_adam) just in time, into torch's default
  # ~/.cache/torch_extensions. Where home is not shared between nodes, SPARSEPO_CACHE_DIR on a shared
  # file system makes it one compile per cluster instead of one per node.
  if [ -n "${SPARSEPO_CACHE_DIR:-}" ]; then
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SPARSEPO_CACHE_DIR/torch_extensions}
  fi
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
}

# `python -m sparsepo.launch ARGS` from this checkout (the Python half of these scripts).
sparsepo_launch_py() {
  PYTHONPATH="$SPARSEPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$(sparsepo_python)" -m sparsepo.launch "$@"
}

sparsepo_launch_env() {
  local out
  out=$(sparsepo_launch_py --print-env) || return $?   # 64: launcher variables that make no sense
  eval "$out"
}

sparsepo_tasks_on_node() {
  sparsepo_launch_py --tasks-on-node "$1" "$2"
}

# logging.output_dir of a sparsepo.train argument list (--config C, overrides, --resume ignored).
sparsepo_output_dir() {
  "$(sparsepo_python)" - "$@" <<'PY'
import sys
args = sys.argv[1:]
config, overrides, i = None, [], 0
while i < len(args):
    a = args[i]
    if a in ("--config", "--resume"):
        config = args[i + 1] if a == "--config" else config
        i += 2
        continue
    if a.startswith("--config="):
        config = a.split("=", 1)[1]
    elif not a.startswith("--"):
        overrides.append(a)
    i += 1
from sparsepo.config import load_config
print(load_config(config, overrides).logging.output_dir)
PY
}

sparsepo_has_checkpoints() {  # DIR: the run directory
  compgen -G "$1/checkpoints/step-*" >/dev/null 2>&1
}

# Prints "--resume auto" when the run should continue: a requeued job, or checkpoints already in
# the run directory. Prints nothing when the arguments already choose (--resume / checkpoint.resume=)
# or SPARSEPO_RESUME=never.
sparsepo_resume_args() {
  local a out
  [ "${SPARSEPO_RESUME:-auto}" = never ] && return 0
  for a in "$@"; do
    case $a in --resume|--resume=*|checkpoint.resume=*) return 0 ;; esac
  done
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then echo "--resume auto"; return 0; fi
  out=""
  for a in "$@"; do   # an override wins over the config file: no need to start python for it
    case $a in logging.output_dir=*) out=${a#logging.output_dir=} ;; esac
  done
  if [ -z "$out" ]; then out=$(sparsepo_output_dir "$@" 2>/dev/null) || out=""; fi
  if [ -n "$out" ] && sparsepo_has_checkpoints "$out"; then
    echo "--resume auto"
  fi
  return 0
}

# Run a job step in the background and wait for it. A USR1 to the batch shell (Slurm's
# `--signal=B:USR1@T` warning before the time limit, or `scancel -b -s USR1 JOB`) is forwarded to the
# step (srun passes it on to every task); a TERM (scancel, Slurm preemption) is forwarded too and
# remembered so that the job is not requeued by us afterwards.
SPARSEPO_GOT_USR1=0
SPARSEPO_GOT_TERM=0

# Call early in a batch script: from here on USR1 / TERM are remembered instead of killing the
# shell (bash's default), so a warning that comes before the step starts is not lost.
sparsepo_trap_preemption() {
  trap 'SPARSEPO_GOT_USR1=1; sparsepo_log "batch shell got USR1"' USR1
  trap 'SPARSEPO_GOT_TERM=1; sparsepo_log "batch shell got TERM"' TERM
}

sparsepo_run_step() {
  local pid rc
  if [ "${SPARSEPO_DRY_RUN:-0}" = 1 ]; then printf 'DRY-RUN:'; printf ' %q' "$@"; echo; return 0; fi
  if [ "$SPARSEPO_GOT_TERM" = 1 ]; then sparsepo_log "TERM before the step started: not starting it"; return 143; fi
  if [ "$SPARSEPO_GOT_USR1" = 1 ]; then
    sparsepo_log "preemption warning before the step started: not starting it"
    return "$SPARSEPO_EXIT_PREEMPTED"
  fi
  "$@" &
  pid=$!
  # shellcheck disable=SC2064
  trap "SPARSEPO_GOT_USR1=1; sparsepo_log 'batch shell got USR1: forwarding to the step'; kill -USR1 $pid 2>/dev/null" USR1
  # shellcheck disable=SC2064
  trap "SPARSEPO_GOT_TERM=1; sparsepo_log 'batch shell got TERM: forwarding to the step'; kill -TERM $pid 2>/dev/null" TERM
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  rc=0; wait "$pid" || rc=$?   # bash keeps the status of a reaped child: this is srun's exit code
  sparsepo_trap_preemption      # late signals: remember them, do not die before the requeue
  return "$rc"
}

sparsepo_requeue_on_preempt() {
  local rc=$1
  if [ "$rc" = 138 ] && [ "$SPARSEPO_GOT_USR1" = 1 ]; then
    # 128 + SIGUSR1: the warning reached the tasks before the trainer listened for it (start-up):
    # no new checkpoint, but the job still has to make way - requeue, resuming from the last one.
    sparsepo_log "the step was killed by the USR1 we forwarded (still starting up): requeueing anyway"
  elif [ "$rc" != "$SPARSEPO_EXIT_PREEMPTED" ]; then
    return 1
  fi
  if [ "$SPARSEPO_GOT_TERM" = 1 ]; then
    sparsepo_log "step exited $rc after a SIGTERM to the job (scancel or Slurm preemption): not requeueing"
    return 1
  fi
  if [ -z "${SLURM_JOB_ID:-}" ]; then sparsepo_log "exit $rc (preempted) outside Slurm: resume with --resume auto"; return 1; fi
  sparsepo_log "step exited $rc (preempted): scontrol requeue $SLURM_JOB_ID" \
               "(this run: SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0})"
  if [ "${SPARSEPO_DRY_RUN:-0}" = 1 ]; then echo "DRY-RUN: scontrol requeue $SLURM_JOB_ID"; return 0; fi
  scontrol requeue "$SLURM_JOB_ID"
}

sparsepo_job_banner() {
  sparsepo_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on ${SLURM_JOB_NODELIST:-?}:" \
               "${SLURM_NTASKS:-?} task(s), SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, repo $SPARSEPO_ROOT"
}
