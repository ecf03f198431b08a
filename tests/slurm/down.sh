#!/usr/bin/env bash
# Stop the one-node Slurm of tests/slurm/up.sh: each daemon through its pid file,
# in reverse start order (slurmd, slurmctld, slurmdbd, MariaDB, munged).
#
#   tests/slurm/down.sh [--quiet] [--purge]
#
# --purge also deletes the state directory (configuration, logs, job state and the
# accounting database). Same environment as up.sh (SURVEYRED_SLURM_STATE).
set -uo pipefail

USER_NAME="$(id -un)"
STATE="${SURVEYRED_SLURM_STATE:-${TMPDIR:-/tmp}/surveyred-slurm-${USER_NAME}}"
QUIET=0
PURGE=0
for arg in "$@"; do
    case "$arg" in
        --quiet) QUIET=1 ;;
        --purge) PURGE=1 ;;
        *) echo "usage: $0 [--quiet] [--purge]" >&2; exit 2 ;;
    esac
done
say() { [ "$QUIET" = 1 ] || printf 'slurm-down: %s\n' "$*" >&2; }

# stop NAME: SIGTERM the pid in $STATE/run/NAME.pid, wait up to 20 s, then SIGKILL
stop() {
    local name=$1 pidfile="$STATE/run/$1.pid" pid i
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile" 2>/dev/null)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) ignored SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

if [ -d "$STATE/run" ]; then
    # cancel what still runs on this test cluster, so no job outlives its slurmd
    if [ -f "$STATE/etc/slurm.conf" ] && [ -f "$STATE/run/slurmctld.pid" ]; then
        SLURM_CONF="$STATE/etc/slurm.conf" PATH="$PATH:/usr/sbin" timeout 10 scancel --user="$USER_NAME" >/dev/null 2>&1
        sleep 1
    fi
    stop slurmd
    stop slurmctld
    stop slurmdbd
    stop mysqld
    stop munged
fi
if [ "$PURGE" = 1 ] && [ -d "$STATE" ]; then
    rm -rf "$STATE"
    say "removed $STATE"
fi
exit 0
