#!/usr/bin/env bash
# Stop the daemons ci/slurm/start.sh started (by their pid files, nothing else).
#   bash ci/slurm/stop.sh                # slurmd, slurmctld, slurmdbd, MariaDB, munged
#   bash ci/slurm/stop.sh --slurm-only   # the SLURM daemons only (start.sh, on a new config)
# The accounting database and the controller's state stay on disk for the next start.
set -euo pipefail

STATE=${BATCHFLIP_SLURM_DIR:-/var/lib/batchflip-slurm}

# stop NAME PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL
stop() {
    local name=$1 pidfile=$2 pid i
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for ((i = 0; i < 60; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "ci/slurm/stop.sh: $name (pid $pid) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

stop slurmd "$STATE/run/slurmd.pid"
stop slurmctld "$STATE/run/slurmctld.pid"
stop slurmdbd "$STATE/run/slurmdbd.pid"
if [ "${1:-}" != --slurm-only ]; then
    stop mariadbd "$STATE/mysql/mariadbd.pid"
    stop munged /run/munge/munged.pid
fi
