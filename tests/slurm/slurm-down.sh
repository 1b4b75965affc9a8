#!/usr/bin/env bash
# Stop the cluster started by slurm-up.sh (same SLURM_CI_DIR): cancel its jobs, stop its daemons
# by PID (never by name: other clusters may run beside it), remove its /etc/hosts line and, unless
# SLURM_CI_KEEP=1, its directory. Safe to run twice or after a failed start.
set -uo pipefail
BASE=${SLURM_CI_DIR:-/tmp/slurm-ci}
MARK="# sparsepo-slurm-ci $BASE"
export SLURM_CONF=$BASE/etc/slurm.conf
stop_pids() {  # TERM all given pidfiles at once, wait up to 10 s, then KILL leftovers
  local f pid pids="" alive=""
  for f in "$@"; do pid=$(cat "$f" 2>/dev/null) && kill -TERM "$pid" 2>/dev/null && pids="$pids $pid"; done
  for _ in $(seq 1 50); do
    alive=""; for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    [ -z "$alive" ] && return 0; sleep 0.2
  done
  for pid in $alive; do echo "slurm-down: pid $pid ignored TERM, killing" >&2; kill -KILL "$pid" 2>/dev/null; done
}
if [ -f "$SLURM_CONF" ] && [ -f "$BASE/run/slurmctld.pid" ]; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null) || jobs=""
  if [ -n "$jobs" ]; then timeout 10 scancel --full $jobs 2>/dev/null || timeout 10 scancel $jobs || true; fi
  for _ in $(seq 1 40); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi
stop_pids "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid"
stop_pids "$BASE/munge/munged.pid"   # last: slurm daemons need munge while exiting
if grep -qF "$MARK" /etc/hosts; then  # no sed -i: /etc/hosts may be a bind mount
  h=$(grep -vF "$MARK" /etc/hosts); printf '%s\n' "$h" > /etc/hosts
fi
[ "${SLURM_CI_KEEP:-0}" = 1 ] || rm -rf "$BASE"
exit 0
