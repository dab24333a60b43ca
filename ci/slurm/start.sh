#!/usr/bin/env bash
# A single-node SLURM cluster on this host, for the `slurm` test (tests/test_slurm.py) and
# for trying profiles/slurm by hand. Installs nothing: it needs Debian's slurmctld, slurmd,
# slurmdbd, slurm-client, munge and mariadb-server (.ci/run installs them when missing).
#
#   bash ci/slurm/start.sh    # write the configs, start the daemons, wait for an idle node
#   bash ci/slurm/stop.sh     # stop what start.sh started
#
# Runs as root in a container without systemd: every daemon is started directly and
# tracked by a pid file under $BATCHFLIP_SLURM_DIR (default /var/lib/batchflip-slurm).
# Idempotent: daemons already running with the same configuration are left alone; a
# changed configuration restarts them. What it sets up (docs/clusters.md explains why):
#   - cluster `batchflip`, one node (this host, 127.0.0.1) declared with 16 CPUs, 128 GiB
#     and `Gres=gpu:2` (two placeholder device files: no GPU behind them), whatever the
#     machine has (SlurmdParameters=config_overrides), so that the profile's requests fit;
#   - partitions `cpu` (default) and `gpu`, both on that node;
#   - accounting through slurmdbd into MariaDB (database slurm_acct_db), the cluster
#     registered with sacctmgr: the executor plugin follows job states with `sacct`;
#   - no cgroups (proctrack/linuxproc, task/none): nothing here needs systemd.
set -euo pipefail

STATE=${BATCHFLIP_SLURM_DIR:-/var/lib/batchflip-slurm}
CLUSTER=batchflip
HOST=$(hostname -s)
CONF=/etc/slurm                      # where Debian's slurm commands look (no SLURM_CONF needed)
DB_PASS=batchflip-slurm              # a local test database reachable only through its socket
MYSQL_SOCK=/run/mysqld/mysqld.sock

die() { echo "ci/slurm/start.sh: $*" >&2; exit 1; }

for bin in slurmctld slurmd slurmdbd munged mariadbd sinfo sacctmgr scontrol; do
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] ||
        die "$bin is missing: apt-get install slurmctld slurmd slurmdbd slurm-client munge mariadb-server"
done
[ "$(id -u)" = 0 ] || die "must run as root (it starts munged, MariaDB and the SLURM daemons)"
export PATH=/usr/sbin:/sbin:$PATH

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every half second; fail naming WHAT
wait_for() {
    local secs=$1 what=$2; shift 2
    local i
    for ((i = 0; i < secs * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "ci/slurm/start.sh: timed out after ${secs}s waiting for $what; logs in $STATE/log:" >&2
    tail -n 20 "$STATE"/log/*.log "$STATE"/mysql/*.log >&2 2>/dev/null || true
    exit 1
}

mkdir -p "$STATE"/{log,ctld,spool,run} "$CONF"

# --- configuration -------------------------------------------------------------------------
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
cat >"$new/slurm.conf" <<EOF
# written by ci/slurm/start.sh: a one-node test cluster (docs/clusters.md)
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no systemd, no cgroups: processes are tracked through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# accounting: the executor plugin polls job states with sacct
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
# the node is declared as the profile needs it, not as this machine is
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=16 RealMemory=131072 Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
# Two GPUs without GPUs: slurmd drops a GPU gres without File= ("Ignoring file-less GPU";
# the node then registers gpu:0 and goes INVALID) and wants character devices there, so
# the files are copies of /dev/null (1:3) and /dev/zero (1:5), or links to them where
# mknod is not allowed (slurmd logs an error for a link but uses it). Nothing opens them
# (task/none: no device cgroup); they give SLURM two device indices to hand out. A real
# site lists its /dev/nvidia* here or uses AutoDetect=nvml.
mkdir -p "$STATE/gpus"
for i in 0 1; do
    f=$STATE/gpus/gpu$i minor=$((3 + 2 * i)) src=$([ "$i" = 0 ] && echo /dev/null || echo /dev/zero)
    [ -c "$f" ] && [ ! -L "$f" ] && continue
    rm -f "$f"
    mknod -m 666 "$f" c 1 "$minor" 2>/dev/null || ln -s "$src" "$f"
done
cat >"$new/gres.conf" <<EOF
# written by ci/slurm/start.sh: placeholder device files, no GPUs behind them
AutoDetect=off
NodeName=$HOST Name=gpu File=$STATE/gpus/gpu[0-1]
EOF
cat >"$new/slurmdbd.conf" <<EOF
# written by ci/slurm/start.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

changed=0
for f in slurm.conf gres.conf slurmdbd.conf; do
    cmp -s "$new/$f" "$CONF/$f" || changed=1
done
if [ "$changed" = 1 ]; then
    bash "$(dirname "$0")/stop.sh" --slurm-only
    install -m 644 "$new/slurm.conf" "$CONF/slurm.conf"
    install -m 644 "$new/gres.conf" "$CONF/gres.conf"
    install -m 600 "$new/slurmdbd.conf" "$CONF/slurmdbd.conf"  # holds the DB password
fi

# --- munge ---------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
if ! alive /run/munge/munged.pid; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
fi
wait_for 15 "munged" bash -c 'munge -n </dev/null | unmunge'

# --- MariaDB: the accounting database ------------------------------------------------------
if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/log/mariadb-install.log"
fi
# mariadbd runs as mysql: its pid file and log go to a folder of its own
mkdir -p /run/mysqld "$STATE/mysql" && chown mysql:mysql /run/mysqld "$STATE/mysql"
if ! alive "$STATE/mysql/mariadbd.pid"; then
    # the socket only: nothing listens on a port
    mariadbd --user=mysql --datadir=/var/lib/mysql --socket=$MYSQL_SOCK --skip-networking \
        --pid-file="$STATE/mysql/mariadbd.pid" --log-error="$STATE/mysql/mariadbd.log" \
        --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
fi
wait_for 60 "MariaDB" mariadb --socket=$MYSQL_SOCK -e "SELECT 1"
mariadb --socket=$MYSQL_SOCK <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# --- slurmdbd, the cluster in the accounting database, slurmctld, slurmd -----------------
if ! alive "$STATE/run/slurmdbd.pid"; then
    slurmdbd
fi
wait_for 60 "slurmdbd" sacctmgr -n list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if ! alive "$STATE/run/slurmctld.pid"; then
    slurmctld
fi
wait_for 60 "slurmctld" scontrol ping
if ! alive "$STATE/run/slurmd.pid"; then
    slurmd
fi
# a node that was down (a previous run stopped it) comes back through ReturnToService=2;
# one drained by an earlier configuration is resumed once it has registered again
node_up() { [ -n "$(sinfo -h -n "$HOST" -o %t | grep -Ev 'unk|down|inval')" ]; }
wait_for 60 "node $HOST to register" node_up
if sinfo -h -n "$HOST" -o %t | grep -Eq 'drain|drng'; then
    scontrol update NodeName="$HOST" State=RESUME
fi
node_idle() { [ "$(sinfo -h -n "$HOST" -o %t | sort -u)" = idle ]; }
wait_for 60 "node $HOST to be idle in sinfo" node_idle
sinfo
