#!/usr/bin/env bash
# Start a one-node Slurm (munged, MariaDB, slurmdbd, slurmctld, slurmd) for the
# workflow tests, or for trying `snakemake --profile profiles/slurm` on a laptop.
#
#   tests/slurm/up.sh             # start (idempotent: a running cluster is kept)
#   source "$STATE/env.sh"        # SLURM_CONF for sbatch/squeue/sacct/snakemake
#   tests/slurm/down.sh           # stop every daemon through its pid file
#
# Needs Debian/Ubuntu packages: slurm-wlm slurmdbd munge mariadb-server (Slurm
# 22.05 on Debian 12). No systemd and no cgroups are needed, nothing is written
# outside $STATE and root is not needed: every daemon runs as the calling user,
# on its own ports and sockets, so it does not disturb a Slurm or MariaDB that the
# machine already runs.
#
# Environment:
#   SURVEYRED_SLURM_STATE      state directory (default ${TMPDIR:-/tmp}/surveyred-slurm-$USER)
#   SURVEYRED_SLURM_PORT_BASE  slurmctld port; slurmd, slurmdbd and MariaDB use
#                              the next three (default 16817)
#   SURVEYRED_SLURM_CPUS       CPUs of the node (default: nproc)
#   SURVEYRED_SLURM_MEMORY_MB  memory of the node (default: 80 % of MemTotal)
#
# Exit status 0 when `sinfo` shows the node idle; otherwise non-zero, with the
# failing daemon's log tail on stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
USER_NAME="$(id -un)"
STATE="${SURVEYRED_SLURM_STATE:-${TMPDIR:-/tmp}/surveyred-slurm-${USER_NAME}}"
PORT_BASE="${SURVEYRED_SLURM_PORT_BASE:-16817}"
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
CPUS="${SURVEYRED_SLURM_CPUS:-$(nproc)}"
MEM_TOTAL_MB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
REAL_MEMORY="${SURVEYRED_SLURM_MEMORY_MB:-$((MEM_TOTAL_MB * 8 / 10))}"
DEF_MEM_PER_CPU=$((REAL_MEMORY / CPUS / 2))
[ "$DEF_MEM_PER_CPU" -gt 2000 ] && DEF_MEM_PER_CPU=2000
T0=$(date +%s.%N)

say() { printf 'slurm-up: %s\n' "$*" >&2; }
die() {
    say "ERROR: $1"
    if [ -n "${2:-}" ] && [ -f "$2" ]; then
        say "--- last lines of $2"
        tail -n 30 "$2" >&2
    fi
    exit 1
}
need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian packages slurm-wlm slurmdbd munge mariadb-server"
}
# wait_for SECONDS DESCRIPTION LOG COMMAND...: poll COMMAND every 0.2 s
wait_for() {
    local limit=$1 what=$2 log=$3
    shift 3
    local end=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$end" ]; then
            die "$what did not come up within ${limit} s" "$log"
        fi
        sleep 0.2
    done
}
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# /usr/sbin holds the daemons but is not on a normal user's PATH
export PATH="$PATH:/usr/sbin:/sbin"

for cmd in munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sinfo sacctmgr sbatch sacct srun; do
    need "$cmd"
done

export SLURM_CONF="$STATE/etc/slurm.conf"
if alive "$STATE/run/slurmctld.pid" && alive "$STATE/run/slurmd.pid" && alive "$STATE/run/slurmdbd.pid" \
    && sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
    say "already running (state $STATE)"
    echo "$STATE/env.sh"
    exit 0
fi
# something is half up (or stale pid files): stop it, then start from scratch
"$HERE/down.sh" --quiet || true

mkdir -p "$STATE"/{etc,run,log,ctld,slurmd,munge,mysql,bin}
chmod 700 "$STATE/munge"
cat >"$STATE/env.sh" <<EOF
# source this file to use the test Slurm (written by tests/slurm/up.sh)
export SLURM_CONF="$SLURM_CONF"
export PATH="$STATE/bin:\$PATH:/usr/sbin:/sbin"
EOF
# Inside a job, the Snakemake slurm-jobstep plugin runs `srun` with every SLURM_*
# variable removed, SLURM_CONF too; srun would then look for /etc/slurm/slurm.conf.
# This srun (first on PATH, which jobs inherit) puts SLURM_CONF back.
REAL_SRUN="$(command -v srun)"
cat >"$STATE/bin/srun" <<EOF
#!/bin/sh
SLURM_CONF="\${SLURM_CONF:-$SLURM_CONF}" exec "$REAL_SRUN" "\$@"
EOF
chmod +x "$STATE/bin/srun"

subst() {
    sed -e "s|@STATE@|$STATE|g" -e "s|@USER@|$USER_NAME|g" \
        -e "s|@CTLD_HOST@|$(hostname -s)|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@REAL_MEMORY@|$REAL_MEMORY|g" \
        -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" "$1"
}
if [ ! -f "$STATE/etc/dbpass" ]; then
    (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/etc/dbpass")
fi
DB_PASS="$(cat "$STATE/etc/dbpass")"
subst "$HERE/slurm.conf.in" >"$STATE/etc/slurm.conf"
(umask 077 && subst "$HERE/slurmdbd.conf.in" >"$STATE/etc/slurmdbd.conf")

# -- munge: its own key and socket ---------------------------------------------------
if [ ! -f "$STATE/munge/munge.key" ]; then
    mungekey --create --keyfile="$STATE/munge/munge.key" 2>"$STATE/log/mungekey.log" \
        || die "mungekey failed" "$STATE/log/mungekey.log"
fi
chmod 600 "$STATE/munge/munge.key"
munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed" 2>>"$STATE/log/munged.log" \
    || die "munged did not start" "$STATE/log/munged.log"
wait_for 10 munged "$STATE/log/munged.log" test -S "$STATE/munge/munge.socket"

# -- MariaDB for slurmdbd: own data directory, loopback port --------------------------
MYSQL_ARGS=(--no-defaults --datadir="$STATE/mysql" --socket="$STATE/run/mysqld.sock"
    --pid-file="$STATE/run/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1
    --log-error="$STATE/log/mysqld.log" --innodb-buffer-pool-size=64M
    --innodb-log-file-size=48M --skip-name-resolve --user="$USER_NAME")
FRESH_DB=0
if [ ! -d "$STATE/mysql/mysql" ]; then
    FRESH_DB=1
    mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user="$USER_NAME" \
        --auth-root-authentication-method=normal --skip-test-db \
        >"$STATE/log/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed" "$STATE/log/mariadb-install.log"
fi
nohup mariadbd "${MYSQL_ARGS[@]}" >/dev/null 2>&1 &
sql() { mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -uroot "$@"; }
wait_for 60 MariaDB "$STATE/log/mysqld.log" sql -e "select 1"
if [ "$FRESH_DB" = 1 ]; then
    sql <<EOF || die "creating the slurm database user failed" "$STATE/log/mysqld.log"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
fi

# -- slurmdbd, then the cluster, account and user in the accounting database --------
slurmdbd >>"$STATE/log/slurmdbd.log" 2>&1 || die "slurmdbd did not start" "$STATE/log/slurmdbd.log"
wait_for 60 slurmdbd "$STATE/log/slurmdbd.log" sacctmgr -n list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx surveyred; then
    sacctmgr -i add cluster surveyred >/dev/null
fi
if ! sacctmgr -n -P list account format=account | grep -qx surveyred; then
    sacctmgr -i add account surveyred cluster=surveyred description=tests organization=surveyred >/dev/null
fi
if ! sacctmgr -n -P list user format=user | grep -qx "$USER_NAME"; then
    sacctmgr -i add user "$USER_NAME" account=surveyred cluster=surveyred >/dev/null
fi

# -- slurmctld and slurmd ---------------------------------------------------------------
slurmctld >>"$STATE/log/slurmctld.log" 2>&1 || die "slurmctld did not start" "$STATE/log/slurmctld.log"
wait_for 30 slurmctld "$STATE/log/slurmctld.log" scontrol ping
slurmd -N localhost >>"$STATE/log/slurmd.log" 2>&1 || die "slurmd did not start" "$STATE/log/slurmd.log"
node_up() { sinfo -h -n localhost -o %T | grep -Eq '^(idle|mixed|allocated)$'; }
wait_for 30 "slurmd (node localhost idle)" "$STATE/log/slurmd.log" node_up

say "up in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s:" \
    "node localhost, $CPUS CPUs, ${REAL_MEMORY} MB, DefMemPerCPU=${DEF_MEM_PER_CPU}; state $STATE"
say "use it with: source $STATE/env.sh"
echo "$STATE/env.sh"
