#!/usr/bin/env bash
# Start a throw-away Slurm cluster on loopback for the tests: munged + slurmctld + N slurmd
# (emulated nodes node1..nodeN, all on 127.0.0.1). Needs root. Takes about 1 s once the Debian
# packages are there (they are installed with apt-get when missing).
#
#   SLURM_CI_DIR=/tmp/sparsepo-slurm SLURM_CI_PORT=16817 bash tests/slurm/slurm-up.sh
#   export SLURM_CONF=$SLURM_CI_DIR/etc/slurm.conf
#   ... sbatch / squeue / scontrol ...
#   SLURM_CI_DIR=/tmp/sparsepo-slurm bash tests/slurm/slurm-down.sh
#
# Variables: SLURM_CI_DIR (default /tmp/slurm-ci; must be world-traversable, so not pytest's
# mode-700 tmp dir), SLURM_CI_NODES (2), SLURM_CI_CPUS (CPUs per emulated node, 2),
# SLURM_CI_PORT (slurmctld port, 16817; the nodes use the next N ports), SLURM_CI_HOSTS (1: add
# node1..nodeN to /etc/hosts so `scontrol show hostnames | head -1` works as MASTER_ADDR),
# SLURM_CI_FIRST_JOB_ID (1; jobs derive MASTER_PORT = 20000 + job id % 10000, so two clusters on
# one host should start at different ids), SLURM_CI_KILLWAIT (5 s between SIGTERM and SIGKILL).
# Exit codes: 0 up (prints SLURM_CONF=...), 77 cannot run here (not root / packages not
# installable: the tests skip), 1 the cluster did not come up (see $SLURM_CI_DIR/log).
set -euo pipefail
BASE=${SLURM_CI_DIR:-/tmp/slurm-ci}; NODES=${SLURM_CI_NODES:-2}; CPUS=${SLURM_CI_CPUS:-2}
PORT=${SLURM_CI_PORT:-16817}; CONF=$BASE/etc/slurm.conf
MARK="# sparsepo-slurm-ci $BASE"   # our /etc/hosts line; slurm-down.sh removes exactly this one

if [ "$(id -u)" != 0 ]; then echo "slurm-up: needs root (slurmd runs jobs as any user)" >&2; exit 77; fi
need=""
for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || need=1; done
if [ -n "$need" ]; then
  if ! command -v apt-get >/dev/null; then echo "slurm-up: Slurm is not installed and apt-get is missing" >&2; exit 77; fi
  echo "slurm-up: installing Debian's Slurm packages" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null; }; then
    echo "slurm-up: apt-get could not install slurmctld slurmd slurm-client munge" >&2; exit 77
  fi
fi

mkdir -p "$BASE"/{etc,log,run,munge,state/ctld} $(seq -f "$BASE/state/node%g/tmp" 1 "$NODES")
chmod 755 "$BASE" "$BASE/munge"   # munged: socket dir must be o+x
[ -s "$BASE/munge/munge.key" ] || { dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$BASE/munge/munge.key"; }
munged --key-file="$BASE/munge/munge.key" --socket="$BASE/munge/munge.socket.2" \
  --pid-file="$BASE/munge/munged.pid" --log-file="$BASE/log/munged.log" \
  --seed-file="$BASE/munge/munged.seed"
cat > "$CONF" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.socket.2,cred_expire=${SLURM_CI_CRED_EXPIRE:-10}
SlurmctldPort=$PORT
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/%n
TmpFS=$BASE/state/%n/tmp
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
KillWait=${SLURM_CI_KILLWAIT:-5}
SchedulerParameters=sched_interval=2,bf_interval=2
FirstJobId=${SLURM_CI_FIRST_JOB_ID:-1}
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.log
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((PORT+1))-$((PORT+NODES))] CPUs=$CPUS CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=2000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
# node names must resolve: MASTER_ADDR is the first host of the job's node list
if [ "${SLURM_CI_HOSTS:-1}" = 1 ] && ! grep -qF "$MARK" /etc/hosts; then
  echo "127.0.0.1 $(seq -f 'node%g' -s ' ' 1 "$NODES") $MARK" >> /etc/hosts
fi
export SLURM_CONF=$CONF
slurmctld -f "$CONF" -i
for i in $(seq 1 "$NODES"); do slurmd -f "$CONF" -N "node$i"; done
for _ in $(seq 1 60); do   # wait (<=30 s) until every node is idle
  [ "$(sinfo -h -N -p debug -t idle -o %N 2>/dev/null | wc -l)" = "$NODES" ] && { echo "SLURM_CONF=$CONF"; exit 0; }
  sleep 0.5
done
echo "slurm-up: the cluster did not come up; see $BASE/log" >&2; sinfo -N >&2 || true
tail -n 20 "$BASE"/log/*.log >&2 || true
exit 1
