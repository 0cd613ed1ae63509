#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the `cpt-bench sweep --executor slurm` tests
# (tests/test_sweep_slurm.py): Debian's slurm-wlm and munge, with slurmctld, slurmd and munged run as root,
# process tracking by /proc (proctrack/linuxproc) and no cgroups, so that it works in a container.
#
#   bash .ci/slurm-localhost.sh start    # install the packages if missing (apt), write slurm.conf, start daemons
#   bash .ci/slurm-localhost.sh stop     # stop the daemons (the packages stay)
#   bash .ci/slurm-localhost.sh status   # sinfo, or why not
#
# Needs root and, to install, apt. Prints one line and exits 1 where it cannot start a cluster; the tests then
# say so and skip.
set -uo pipefail
conf_dir=/etc/slurm
state=/var/spool/cpt-bench-slurm

die() { echo "slurm-localhost: $*" >&2; exit 1; }

start() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmctld, slurmd and munged run as root here)"
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
            >/dev/null 2>&1 || die "apt-get install slurm-wlm munge failed"
    fi
    if sinfo -h >/dev/null 2>&1; then echo "slurm-localhost: already running"; return 0; fi
    mkdir -p "$conf_dir" "$state/ctld" "$state/d" /var/log/slurm /run/munge
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
    chmod 400 /etc/munge/munge.key
    host="$(hostname -s)"
    cpus="$(nproc)"
    memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 3 / 4 ))
    cat > "$conf_dir/slurm.conf" <<EOF
# written by cpt-bench's .ci/slurm-localhost.sh: one node, this machine
ClusterName=cptbench
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    pgrep -x munged >/dev/null || munged --force >/dev/null 2>&1 || die "munged did not start"
    pgrep -x slurmctld >/dev/null || slurmctld -c >/dev/null 2>&1 || die "slurmctld did not start (see /var/log/slurm)"
    pgrep -x slurmd >/dev/null || slurmd -c >/dev/null 2>&1 || die "slurmd did not start (see /var/log/slurm)"
    for _ in $(seq 30); do
        if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "slurm-localhost: started ($host, $cpus CPUs)"; return 0; fi
        sleep 1
    done
    scontrol update nodename="$host" state=resume >/dev/null 2>&1
    sinfo -h -o %T 2>/dev/null | grep -q idle || die "the node did not become idle: $(sinfo -h 2>&1 | head -1)"
    echo "slurm-localhost: started ($host, $cpus CPUs)"
}

stop() {
    for daemon in slurmd slurmctld munged; do pkill -x "$daemon" 2>/dev/null; done
    echo "slurm-localhost: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo 2>&1 ;;
    *) die "usage: $0 start|stop|status" ;;
esac
