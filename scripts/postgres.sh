#!/usr/bin/env bash
# Install and run a real PostgreSQL (Debian's package): a private cluster for the outcomes join
# store shared across gateway replicas, and its tests.
#
#   scripts/postgres.sh install        # apt-get install postgresql if its binaries are missing
#   scripts/postgres.sh start [args]   # initdb on first start, start in the background, wait for
#                                      # connections, create the database; args go to postgres (-c k=v)
#   scripts/postgres.sh stop           # fast shutdown (sessions are ended), wait for exit
#   scripts/postgres.sh status
#
# Environment (defaults in brackets): PGHOME [.run/postgres] (socket, pidfile, log),
# PG_DATA [$PGHOME/data-PORT], PG_PORT [5432], PG_ADDRESS [127.0.0.1], PG_DATABASE [infergate],
# PG_BIN [the newest /usr/lib/postgresql/*/bin]. The superuser is `postgres`, trusted on loopback
# and the socket: postgresql://postgres@127.0.0.1:PORT/infergate. Not a production setup.
#
# As root the cluster runs as the package's `postgres` user (postgres refuses root), owning
# PGHOME; if PGHOME lies below a directory only root may enter (pytest's tmp dirs), that user
# is also given CAP_DAC_READ_SEARCH (ambient) so it can reach it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
home=${PGHOME:-$root/.run/postgres}
port=${PG_PORT:-5432}
address=${PG_ADDRESS:-127.0.0.1}
database=${PG_DATABASE:-infergate}
data=${PG_DATA:-$home/data-$port}
pidfile=$home/postgres-$port.pid
logfile=$home/postgres-$port.log

name=postgres
# shellcheck source=scripts/daemon.sh
. "$(dirname "$0")/daemon.sh"

# daemon.sh's stop sends SIGTERM, which postgres takes as a "smart" shutdown that waits for every
# client to leave; SIGINT first asks for a fast one.
eval "daemon_$(declare -f stop)"
stop() {
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then kill -INT "$(cat "$pidfile")"; fi
  daemon_stop
}

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return 0; fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  if [ -n "$dir" ] && [ -x "$dir/postgres" ]; then echo "$dir"; fi
}

install() {
  if [ -n "$(pg_bin)" ]; then echo "postgres: already installed ($("$(pg_bin)/postgres" --version))"; return 0; fi
  apt_install postgresql
  echo "postgres: installed ($("$(pg_bin)/postgres" --version))"
}

# The command prefix that runs a program as the cluster's owner: ourselves, or the postgres user
# when we are root (setpriv execs the program: a pid recorded for it is the program's).
owner=()

ready() { "$(pg_bin)/pg_isready" -q -h "$address" -p "$port" -t 2; }

psql_admin() { "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h "$address" -p "$port" -U postgres -d postgres "$@"; }

start() {
  [ -n "$(pg_bin)" ] || install
  local bin
  bin=$(pg_bin)
  mkdir -p "$home"
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then
    echo "postgres: already running (pid $(cat "$pidfile"))"; return 0
  fi
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$home"
    owner=(setpriv --reuid=postgres --regid=postgres --init-groups)
    if ! "${owner[@]}" test -x "$home" 2>/dev/null; then
      owner+=(--inh-caps=+dac_read_search --ambient-caps=+dac_read_search)
    fi
  fi
  if [ ! -s "$data/PG_VERSION" ]; then
    "${owner[@]}" "$bin/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=trust --no-sync \
      --no-instructions -E UTF8 >"$logfile" 2>&1 || { tail -n 30 "$logfile" >&2; return 1; }
  fi
  setsid "${owner[@]}" "$bin/postgres" -D "$data" -p "$port" -k "$home" \
    -c listen_addresses="$address" "$@" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  await_ready 300 0.1 "ready on postgresql://postgres@$address:$port/$database (data $data, log $logfile)"
  if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
    psql_admin -c "CREATE DATABASE \"$database\""
  fi
}

cmd=${1:-}; shift || true
case "$cmd" in
  install|start|stop|status) "$cmd" "$@" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
