#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing megaent's batch jobs.
#
#   slurm/local_cluster.sh [start]   install (apt) + configure + start; waits until the node is idle
#   slurm/local_cluster.sh stop [DAEMON ...]   stop slurmd, slurmctld, munged (or only those named)
#   slurm/local_cluster.sh status    print sinfo / daemon state; exit 0 when the node is usable
#
# Idempotent: `start` on a running cluster with the same slurm.conf returns at once; a changed
# config restarts the daemons. Needs root (apt-get, /etc/slurm, daemons run as root). What it changes on
# the machine: the slurm-wlm and munge packages, /etc/slurm/slurm.conf, /etc/munge/munge.key, state under
# $STATE_DIR and logs under $LOG_DIR, and the three daemons (left running until `stop`; tools/test.sh
# stops the ones it started).
#
# Settings that matter for tests:
# - NodeAddr=127.0.0.1: no host-name lookups between the daemons.
# - CPUs=$MEGAENT_SLURM_CPUS (default 8) on a 2-core machine plus OverSubscribe=FORCE:
#   several small gloo jobs may share the cores.
# - AuthInfo=cred_expire=5: a requeued job may restart 5 s after it ended (default 120 s).
# - JobRequeue=1, SchedulerParameters=sched_interval=2: requeued and new jobs start promptly.
# - KillWait=30: time between SIGTERM and SIGKILL on cancel/requeue (checkpoint-on-TERM budget).
# - proctrack/linuxproc, task/none, no accounting: works in containers without cgroup delegation.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=${MEGAENT_SLURM_STATE:-/var/spool/megaent-slurm}
LOG_DIR=/var/log/megaent-slurm
NODE=$(hostname -s)
CPUS=${MEGAENT_SLURM_CPUS:-8}
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

log() { echo "[local_cluster] $*" >&2; }

# This cluster's processes named exactly $1: not those of slurm/netns_cluster.sh (started with -f its conf).
our_pids() {
  local pid
  for pid in $(pgrep -x "$1" 2>/dev/null || true); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q slurm-megaent-multi || echo "$pid"
  done
}

# Alive = one of ours in a state other than zombie (PID 1 here reaps slowly).
alive() {
  local pid
  for pid in $(our_pids "$1"); do
    if [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]; then return 0; fi
  done
  return 1
}

# Send SIGTERM to our live (non-zombie) processes named exactly $1, then wait for them to go.
stop_daemon() {
  local name=$1 pid i
  for pid in $(our_pids "$name"); do
    if [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  for i in $(seq 50); do alive "$name" || return 0; sleep 0.2; done
  for pid in $(our_pids "$name"); do kill -9 "$pid" 2>/dev/null || true; done
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    log "error: Slurm is not installed and installing needs root; run as root or apt-get install slurm-wlm munge"
    exit 1
  fi
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
  }
}

write_conf() {
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# Written by megaent slurm/local_cluster.sh: one node on 127.0.0.1 for tests.
ClusterName=megaent-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# The node reports the configured CPUs (more than the real cores) instead of being marked INVAL.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=30
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1  # unchanged
  fi
  mv "$tmp" "$CONF"
  chmod 644 "$CONF"
  return 0  # changed
}

node_ready() {
  local state
  state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1) || return 1
  case "$state" in idle*|mix*|alloc*|comp*) return 0 ;; *) return 1 ;; esac
}

start_munge() {
  if alive munged; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  rm -f /run/munge/munge.socket.2.lock
  # --force: a stale socket from a killed munged must not block the restart.
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged --force
  else
    munged --force
  fi
  local i
  for i in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "error: munged did not come up; see /var/log/munge/munged.log"
  exit 1
}

start() {
  install_packages
  local changed=0
  write_conf && changed=1
  if [ "$changed" = 0 ] && alive slurmctld && alive slurmd && node_ready; then
    log "already running: node $NODE idle"
    return 0
  fi
  if [ "$changed" = 1 ]; then
    stop_daemon slurmd
    stop_daemon slurmctld
  fi
  start_munge
  # -c: no saved state (jobs/node state of an earlier config); -i: ignore saved state errors.
  if ! alive slurmctld; then slurmctld -c -i; fi
  if ! alive slurmd; then slurmd -N "$NODE"; fi
  local i
  for i in $(seq 150); do
    if node_ready; then
      log "up: node $NODE ($CPUS CPUs) idle after $SECONDS s"
      return 0
    fi
    # A node left DOWN/DRAIN by an earlier run comes back with an explicit resume.
    if [ $((i % 10)) = 0 ]; then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; fi
    sleep 0.2
  done
  log "error: node $NODE not idle after 30 s; sinfo: $(sinfo -h 2>&1 | head -3)"
  log "see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
  exit 1
}

stop() {  # [DAEMON ...]: the named ones (slurmd, slurmctld, munged), default all three, in that order
  local names=("$@") d
  [ ${#names[@]} -eq 0 ] && names=(slurmd slurmctld munged)
  for d in "${names[@]}"; do
    case "$d" in slurmd|slurmctld|munged) stop_daemon "$d" ;; *) log "stop: unknown daemon $d"; exit 2 ;; esac
  done
  log "stopped ${names[*]}"
}

status() {
  for d in munged slurmctld slurmd; do
    if alive "$d"; then echo "$d: running"; else echo "$d: stopped"; fi
  done
  sinfo 2>&1 || true
  node_ready
}

case "${1:-start}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
