#!/usr/bin/env bash
# A single-node Slurm cluster on 127.0.0.1 for trying dgmm's jobqueue configs, as root,
# without systemd: Debian's slurm-wlm and munge, munged + slurmctld + slurmd started directly.
#
#   scripts/slurm_setup.sh install   apt-get install slurm-wlm munge (if missing)
#   scripts/slurm_setup.sh start     install if needed, write the configs, start the daemons,
#                                    wait until the node is idle (prints "started")
#   scripts/slurm_setup.sh stop      stop the daemons this script started (by their pid files)
#   scripts/slurm_setup.sh status    sinfo and squeue
#
# start is idempotent: daemons already answering are left alone and "running" is printed
# instead. Files: /etc/slurm/slurm.conf (overwritten only if it is ours or missing), pid
# files in /run/dgmm-slurm, logs in /var/log/slurm. The node is this host (hostname -s) at
# 127.0.0.1 with its CPUs and 90% of its memory, in the partition "debug" (the default).
# Slurm's own process tracking and task plugins are the non-cgroup ones (linuxproc, none),
# so it also runs in containers and gVisor sandboxes.
set -euo pipefail

ACTION="${1:-start}"
RUN=/run/dgmm-slurm
CONF=/etc/slurm/slurm.conf
MARK="# written by dgmm scripts/slurm_setup.sh"
NODE="$(hostname -s)"

die() { echo "slurm_setup: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root"

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm_setup: keeping the existing $CONF (not written by this script)" >&2
    return
  fi
  local cpus mem
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$RUN"
  cat >"$CONF" <<EOF
$MARK
ClusterName=dgmm
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$RUN/munged.pid"
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not start (see /var/log/munge/munged.log)"
}

running() { scontrol ping 2>/dev/null | grep -q "is UP"; }

start() {
  install
  mkdir -p "$RUN"
  start_munge
  if running && sinfo -h -N -o %t 2>/dev/null | grep -qE "idle|mix|alloc"; then
    echo running
    return
  fi
  write_config
  [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null || slurmctld
  for _ in $(seq 100); do running && break; sleep 0.1; done
  running || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
  [ -f "$RUN/slurmd.pid" ] && kill -0 "$(cat "$RUN/slurmd.pid")" 2>/dev/null || slurmd
  for _ in $(seq 150); do
    state="$(sinfo -h -N -o %t 2>/dev/null | head -1)"
    case "$state" in
      idle*|mix*|alloc*) echo started; return ;;
      down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  die "the node did not become idle (state: ${state:-none}; see /var/log/slurm/slurmd.log)"
}

stop() {
  for name in slurmd slurmctld munged; do
    pidfile="$RUN/$name.pid"
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
  done
  echo stopped
}

case "$ACTION" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  *) die "usage: $0 [install|start|stop|status]" ;;
esac
