#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_sweep.py and for trying
# scripts/sweep.py --backend slurm without a cluster:
#   sudo bash scripts/slurm_local.sh
# Installs slurmctld, slurmd, slurm-client and munge with apt-get when they are missing, writes a
# minimal slurm.conf naming this host (all its CPUs, no cgroups), creates a munge key, and starts
# munged, slurmctld and slurmd unless they run already. Idempotent: a second call only checks.
# A controller that already answers (a real cluster's node) is used as it is and never touched.
# Exit status 3, with the reason on stdout, where it cannot run (not root, no apt-get).
set -euo pipefail

cannot() { echo "slurm_local: cannot run here: $*"; exit 3; }
conf=/etc/slurm/slurm.conf
marker="# written by scripts/slurm_local.sh"
host=$(hostname -s)

node_ready() {
  local state
  state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1) || return 1
  [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

want=$(cat <<EOF
$marker: a one-node cluster on $host
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
ours() { [ -f "$conf" ] && grep -qF "$marker" "$conf"; }
if command -v sinfo >/dev/null && node_ready && { ! ours || [ "$(cat "$conf")" == "$want" ]; }; then
  echo "slurm_local: a SLURM controller answers and a node is up; nothing to do"
  sinfo
  exit 0
fi
[ "$(id -u)" -eq 0 ] || cannot "not root (installing and starting the daemons needs root)"
if [ -f "$conf" ] && ! ours; then
  cannot "$conf exists and is not ours, but no controller answers; start that cluster instead"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || cannot "no apt-get to install slurmctld, slurmd, slurm-client, munge"
  echo "slurm_local: installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
restart=0
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
  printf '%s\n' "$want" > "$conf"
  restart=1
fi

# munge: one key (the package usually creates it), daemon running as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
fi

# The daemons read slurm.conf at start: a changed file restarts the ones this script started.
pid_of() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && cat "$1"; }
for daemon in slurmctld slurmd; do
  pidfile=/run/$daemon.pid
  if pid=$(pid_of "$pidfile") && [ $restart -eq 1 ]; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  pid_of "$pidfile" >/dev/null || "/usr/sbin/$daemon"
done

for _ in $(seq 60); do
  node_ready && break
  state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true)
  if [[ $state == down* || $state == drain* ]]; then
    scontrol update NodeName="$host" State=RESUME 2>/dev/null || true
  fi
  sleep 1
done
node_ready || { echo "slurm_local: the node did not come up; see /var/log/slurm/"; sinfo || true
                tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log || true; exit 1; }
echo "slurm_local: one-node cluster up on $host"
sinfo
