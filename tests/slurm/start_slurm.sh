#!/usr/bin/env bash
# A one-node SLURM on this machine, for tests/test_slurm.py (and .ci/run): Debian's slurmd,
# slurmctld, slurm-client and munge, started by hand (no systemd). Idempotent: a second call
# finds the node idle and returns at once. Needs root; installs with apt-get when sbatch is absent.
# Prints one line of timings on success; exit 1 with the reason on failure.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
WAIT_SECONDS=${SLURM_START_WAIT:-60}

die() { echo "start_slurm.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start=$(now)
if command -v sinfo >/dev/null && alive /run/slurmctld.pid && alive /run/slurmd.pid \
        && [[ $(node_state) == idle* || $(node_state) == mix* || $(node_state) == alloc* ]]; then
    echo "slurm already up: node $(node_state)"
    exit 0
fi
[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"

installed=0
if ! command -v slurmd >/dev/null || ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "sbatch is absent and apt-get is not available to install SLURM"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmd slurmctld slurm-client munge >/dev/null \
        || die "apt-get install slurmd slurmctld slurm-client munge failed"
    installed=1
fi
install_seconds=$(seconds_since "$start")
daemons_start=$(now)

# munge: a key (the package may have made one), its run directory, the daemon as user munge.
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! pgrep -u munge -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work (see /var/log/munge/munged.log)"

# slurm.conf: one node, the line slurmd -C prints, every address 127.0.0.1, no cgroups.
host=$(hostname -s)
node_line=$(slurmd -C | grep '^NodeName=' | sed -E 's/ UpTime=.*//') || die "slurmd -C printed no NodeName line"
[[ -n $node_line ]] || die "slurmd -C printed no NodeName line"
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
wanted=$(cat <<EOF
# Written by tests/slurm/start_slurm.sh: a single-node test cluster.
ClusterName=hcsdask
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
$node_line NodeAddr=127.0.0.1 NodeHostname=$host State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$wanted" ]]; then
    printf '%s\n' "$wanted" >"$CONF"
    # A changed configuration is picked up by restarted daemons only.
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if alive $pidfile; then kill "$(cat $pidfile)"; fi
    done
    for _ in $(seq 50); do alive /run/slurmctld.pid || alive /run/slurmd.pid || break; sleep 0.1; done
fi

if ! alive /run/slurmctld.pid; then
    slurmctld -c -i || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
if ! alive /run/slurmd.pid; then
    slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
fi

deadline=$(( $(date +%s) + WAIT_SECONDS ))
state=
while (( $(date +%s) < deadline )); do
    state=$(node_state)
    case $state in
        idle*|mix*|alloc*) break ;;
        down*|drain*|fail*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case $state in
    idle*|mix*|alloc*) ;;
    *) die "node $host is '${state:-absent}' after ${WAIT_SECONDS} s (see $LOG_DIR/slurmd.log, $LOG_DIR/slurmctld.log)" ;;
esac
echo "slurm up: node $host $state; install $install_seconds s (installed=$installed), daemons $(seconds_since "$daemons_start") s"
