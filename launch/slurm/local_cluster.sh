#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests and for trying the sbatch scripts.
#
#   bash launch/slurm/local_cluster.sh install   # apt-get the Debian packages (only those missing)
#   bash launch/slurm/local_cluster.sh start     # munged + slurmctld + slurmd, waits for an idle node
#   bash launch/slurm/local_cluster.sh status    # exit 0 and `sinfo` when up, exit 1 when not
#   bash launch/slurm/local_cluster.sh stop      # ends the daemons this script started
#   bash launch/slurm/local_cluster.sh env       # prints `export SLURM_CONF=...` for client commands
#
# Needs root (the daemons run as root so jobs can run as any user) and Debian/Ubuntu packages
# slurmctld slurmd slurm-client munge. Nothing outside the state dir is written except by apt-get:
# the config, munge key, sockets, spool, logs and pid files all live in
# $SCALETRAIN_SLURM_DIR (default /var/lib/scaletrain-slurm: root-owned, not the shared temporary
# folder, where another user could pre-create it). Client commands find the cluster through
# SLURM_CONF=$SCALETRAIN_SLURM_DIR/slurm.conf; jobs inherit it.
#
# Knobs (environment): SCALETRAIN_SLURM_DIR, SCALETRAIN_SLURM_PORT (slurmctld port, slurmd uses +1;
# default 6817), SCALETRAIN_SLURM_CPUS (default: this machine's CPU count).
set -euo pipefail

STATE=${SCALETRAIN_SLURM_DIR:-/var/lib/scaletrain-slurm}
PORT=${SCALETRAIN_SLURM_PORT:-6817}
CPUS=${SCALETRAIN_SLURM_CPUS:-$(nproc)}
NODE=$(hostname -s)
CONF=$STATE/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$CONF

die() { echo "local_cluster: $*" >&2; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "must run as root (the Slurm daemons run as root)"; }

# The state folder holds the munge key and the config that root daemons read: refuse a symlink (at
# the folder or any of its parts we create) and a folder owned by someone else, then create it 0755.
check_state_dir() {
  local dir=$1 uid=${2:-$(id -u)} owner
  [[ $dir == /* ]] || { echo "local_cluster: state folder $dir must be an absolute path" >&2; return 1; }
  if [[ -L $dir ]]; then
    echo "local_cluster: state folder $dir is a symlink; refusing (remove it or set SCALETRAIN_SLURM_DIR)" >&2
    return 1
  fi
  if [[ -e $dir ]]; then
    owner=$(stat -c %u "$dir")
    if [[ ! -d $dir || $owner != "$uid" ]]; then
      echo "local_cluster: state folder $dir exists but is not a folder owned by uid $uid; refusing" >&2
      return 1
    fi
  else
    mkdir -p -m 0755 "$dir" || return 1
  fi
  return 0
}

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

cmd_install() {
  need_root
  local missing
  missing=$(missing_packages)
  if [[ -z $missing ]]; then
    echo "local_cluster: packages already installed"
    return 0
  fi
  command -v apt-get >/dev/null || die "apt-get not found; install ${PACKAGES[*]} with your package manager"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; }
}

write_config() {
  check_state_dir "$STATE" || exit 1
  local sub
  for sub in munge ctld spool log; do
    [[ -L $STATE/$sub ]] && die "$STATE/$sub is a symlink; refusing"
  done
  mkdir -p "$STATE"/{munge,ctld,spool,log}
  chmod 0755 "$STATE"
  chmod 0700 "$STATE/munge"
  [[ -s $STATE/munge/munge.key ]] || { mungekey --create --keyfile="$STATE/munge/munge.key" 2>/dev/null \
    || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none; }
  chmod 0600 "$STATE/munge/munge.key"
  # Short timeouts so tests see node and job state changes quickly; requeue allowed (JobRequeue=1).
  cat >"$CONF" <<EOF
ClusterName=scaletrain-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmdTimeout=30
MessageTimeout=10
KillWait=5
MinJobAge=300
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }

cmd_start() {
  need_root
  [[ -z $(missing_packages) ]] || die "packages missing: $(missing_packages | tr '\n' ' '); run: $0 install"
  if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid" && [[ $(node_state) == idle* ]]; then
    echo "local_cluster: already running"
    return 0
  fi
  write_config
  pid_alive "$STATE/munged.pid" || munged --force --socket="$STATE/munge/munge.socket" \
    --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
  # -c: start clean (no jobs from an earlier run of this local cluster)
  pid_alive "$STATE/slurmctld.pid" || slurmctld -c -f "$CONF"
  pid_alive "$STATE/slurmd.pid" || slurmd -c -N "$NODE" -f "$CONF"
  local i state=""
  for i in $(seq 1 60); do
    state=$(node_state)
    if [[ $state == idle* ]]; then
      echo "local_cluster: up ($NODE, $CPUS CPUs); export SLURM_CONF=$CONF"
      return 0
    fi
    [[ $state == down* || $state == drain* ]] && scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    sleep 1
  done
  die "node not idle after 60 s (state '${state:-no answer}'); see $STATE/log/"
}

cmd_stop() {
  local name pidfile pid
  for name in slurmd slurmctld munged; do
    pidfile=$STATE/$name.pid
    if pid_alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
  done
  echo "local_cluster: stopped"
}

cmd_status() {
  if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid" && sinfo 2>/dev/null; then
    return 0
  fi
  echo "local_cluster: not running"
  return 1
}

case ${1:-} in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
