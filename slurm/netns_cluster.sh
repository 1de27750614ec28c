#!/usr/bin/env bash
# A multi-node Slurm cluster on this one machine: each node a network namespace with its own address.
#
#   slurm/netns_cluster.sh [start]   configure + start; waits until every node is idle
#   slurm/netns_cluster.sh stop      stop the daemons and job processes, remove namespaces, veths, bridge
#   slurm/netns_cluster.sh status    print sinfo / daemon state; exit 0 when every node is usable
#   slurm/netns_cluster.sh env       print `export SLURM_CONF=...` (clients must use this cluster's config)
#
# Layout (MEGAENT_NETNS_NODES nodes, default 3):
#   root namespace   bridge megaent-br0 10.77.0.1/24, slurmctld (port 6827), munged (shared: a unix socket)
#   megaent-mgnodeK  veth 10.77.0.(10+K)/24 to the bridge, its own UTS name mgnodeK, one slurmd (port 6828)
# Node names resolve inside every node through /etc/netns/megaent-mgnodeK/hosts, which the script
# bind-mounts over /etc/hosts in the node's mount namespace (the slurmd's, so every job process's): the
# rendered job's MASTER_ADDR (the first node's name) and the rollout URLs (http://mgnode3:30000) work
# without touching the machine's /etc/hosts. Each node's own name is also its hostname (its own UTS
# namespace), so gloo, which binds to the address of gethostname(), picks the node's address, as on a
# real cluster.
#
# Why a second script, not a mode of local_cluster.sh: this cluster has its own slurm.conf
# (/etc/slurm-megaent-multi/slurm.conf; clients need SLURM_CONF), ports, state and log directories, and
# its daemons are tracked by pid file, so both clusters can run at once (tests of each use their own) and
# stopping one never touches the other. Shared with local_cluster.sh: the munge key and munged, which
# this script starts only when none runs and then stops again on `stop`.
#
# Idempotent: `start` on a running cluster with the same config returns at once; a changed config
# restarts it. Needs root (ip netns, daemons as root) and slurm-wlm + munge installed
# (slurm/local_cluster.sh start installs them). Cold start on a 2-core machine: see slurm/README.md.
set -euo pipefail

NODES=${MEGAENT_NETNS_NODES:-3}
CPUS=${MEGAENT_SLURM_CPUS:-4}
CONF_DIR=/etc/slurm-megaent-multi
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/spool/megaent-slurm-multi
LOG_DIR=/var/log/megaent-slurm-multi
BRIDGE=megaent-br0
NET=10.77.0
CTL_ADDR=$NET.1
CTL_PORT=6827
SLURMD_PORT=6828
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 / NODES ))
export SLURM_CONF=$CONF

log() { echo "[netns_cluster] $*" >&2; }
node_name() { echo "mgnode$1"; }
ns_name() { echo "megaent-mgnode$1"; }
veth_name() { echo "mgveth$1"; }        # root side; the namespace side is eth0
node_addr() { echo "$NET.$((10 + $1))"; }

pid_alive() {  # PID is running and not a zombie (PID 1 here reaps slowly)
  [ -n "$1" ] && [ -e "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != "Z" ]
}
pidfile_alive() { [ -s "$1" ] && pid_alive "$(cat "$1")"; }
kill_pidfile() {  # SIGTERM the pid in $1, wait up to 10 s, then SIGKILL
  local pid i
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  if pid_alive "$pid"; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do pid_alive "$pid" || break; sleep 0.2; done
    pid_alive "$pid" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

write_conf() {  # exit 0 when the config changed
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
  local tmp k names=""
  tmp=$(mktemp)
  for k in $(seq "$NODES"); do names+="${names:+,}$(node_name "$k")"; done
  cat >"$tmp" <<EOF
# Written by megaent slurm/netns_cluster.sh: $NODES nodes, each a network namespace on $NET.0/24.
ClusterName=megaent-multi
SlurmctldHost=$(hostname -s)($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
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
SlurmctldPort=$CTL_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
  for k in $(seq "$NODES"); do
    echo "NodeName=$(node_name "$k") NodeAddr=$(node_addr "$k") CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN" >>"$tmp"
  done
  echo "PartitionName=multi Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4" >>"$tmp"
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$CONF"
  chmod 644 "$CONF"
  return 0
}

hosts_file() {
  local k
  echo "127.0.0.1 localhost"
  echo "$CTL_ADDR megaent-ctl"
  for k in $(seq "$NODES"); do echo "$(node_addr "$k") $(node_name "$k")"; done
}

net_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local k ns veth
  for k in $(seq "$NODES"); do
    ns=$(ns_name "$k"); veth=$(veth_name "$k")
    if ! ip netns list | grep -qw "$ns"; then ip netns add "$ns"; fi
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      ip link del "$veth" 2>/dev/null || true
      ip link add "$veth" type veth peer name "$veth-p"
      ip link set "$veth-p" netns "$ns"
      ip -n "$ns" link set "$veth-p" name eth0
      ip -n "$ns" addr add "$(node_addr "$k")/24" dev eth0
    fi
    ip link set "$veth" master "$BRIDGE" 2>/dev/null || true
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    mkdir -p "/etc/netns/$ns"
    hosts_file >"/etc/netns/$ns/hosts"
  done
}

start_munge() {
  if pgrep -x munged >/dev/null 2>&1 && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  rm -f /run/munge/munge.socket.2.lock
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged --force; else munged --force; fi
  touch "$STATE_DIR/started_munged"  # ours to stop again
  local i
  for i in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "error: munged did not come up; see /var/log/munge/munged.log"
  exit 1
}

nodes_ready() {
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -cE ' (idle|mix|alloc|comp)')" -eq "$NODES" ]
}

daemons_alive() {
  local k
  pidfile_alive "$STATE_DIR/slurmctld.pid" || return 1
  for k in $(seq "$NODES"); do pidfile_alive "$STATE_DIR/slurmd-$(node_name "$k").pid" || return 1; done
}

start() {
  [ "$(id -u)" = 0 ] || { log "error: needs root (ip netns, daemons); run as root"; exit 1; }
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null || {
    log "error: Slurm/munge not installed: run slurm/local_cluster.sh start (apt-get install slurm-wlm munge)"
    exit 1; }
  local changed=0 k name
  write_conf && changed=1
  if [ "$changed" = 0 ] && daemons_alive && nodes_ready; then
    log "already running: $NODES nodes idle"
    return 0
  fi
  [ "$changed" = 1 ] && stop_daemons
  net_up
  start_munge
  # -c: no saved state from an earlier config; -i: ignore saved state errors.
  pidfile_alive "$STATE_DIR/slurmctld.pid" || slurmctld -f "$CONF" -c -i
  for k in $(seq "$NODES"); do
    name=$(node_name "$k")
    pidfile_alive "$STATE_DIR/slurmd-$name.pid" && continue
    mkdir -p "$STATE_DIR/d/$name"
    # Not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup, and slurmd refuses to start without it.
    # The node's own mount namespace shows its hosts file as /etc/hosts (slave propagation: the rest of the
    # file system stays shared), its own UTS namespace carries its name.
    nsenter --net="/run/netns/$(ns_name "$k")" unshare --mount --uts --propagation slave sh -c \
      "mount --bind /etc/netns/$(ns_name "$k")/hosts /etc/hosts && hostname $name && exec slurmd -f $CONF -N $name"
  done
  local i
  for i in $(seq 150); do
    if nodes_ready; then
      log "up: $NODES nodes ($(sinfo -h -o %N)) idle after $SECONDS s; clients: export SLURM_CONF=$CONF"
      return 0
    fi
    if [ $((i % 10)) = 0 ]; then
      for k in $(seq "$NODES"); do
        scontrol update NodeName="$(node_name "$k")" State=RESUME >/dev/null 2>&1 || true
      done
    fi
    sleep 0.2
  done
  log "error: nodes not idle after 30 s; sinfo: $(sinfo -h -N 2>&1 | head -5)"
  log "see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd-*.log"
  exit 1
}

stop_daemons() {
  local k
  for k in $(seq "$NODES"); do kill_pidfile "$STATE_DIR/slurmd-$(node_name "$k").pid"; done
  kill_pidfile "$STATE_DIR/slurmctld.pid"
}

other_slurm_daemons() {  # live slurmctld / slurmd processes that are not this cluster's
  local pid
  for pid in $(pgrep -x slurmctld 2>/dev/null || true) $(pgrep -x slurmd 2>/dev/null || true); do
    pid_alive "$pid" && ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$CONF_DIR" && return 0
  done
  return 1
}

stop() {
  local k ns pids
  stop_daemons
  for k in $(seq "$NODES"); do  # job steps left behind by the slurmd (slurmstepd, trainer ranks, servers)
    ns=$(ns_name "$k")
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "$(veth_name "$k")" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  # munged started here goes too, unless another cluster's daemons (local_cluster.sh) now rely on it.
  if [ -f "$STATE_DIR/started_munged" ] && ! other_slurm_daemons; then
    for k in $(pgrep -x munged 2>/dev/null || true); do kill "$k" 2>/dev/null || true; done
    rm -f "$STATE_DIR/started_munged"
  fi
  log "stopped: daemons, namespaces, veths, bridge $BRIDGE"
}

status() {
  local k
  if pidfile_alive "$STATE_DIR/slurmctld.pid"; then echo "slurmctld: running"; else echo "slurmctld: stopped"; fi
  for k in $(seq "$NODES"); do
    if pidfile_alive "$STATE_DIR/slurmd-$(node_name "$k").pid"; then echo "slurmd $(node_name "$k"): running"
    else echo "slurmd $(node_name "$k"): stopped"; fi
  done
  sinfo -N 2>&1 || true
  daemons_alive && nodes_ready
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 [start|stop|status|env]" >&2; exit 2 ;;
esac
