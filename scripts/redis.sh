#!/usr/bin/env bash
# Install and run a real Redis (Debian's package) for state shared across gateway replicas
# (global rate limits, rollout leader lease, route state, merged drift) and its tests.
#
#   scripts/redis.sh install         # apt-get install redis-server if redis-server is missing
#   scripts/redis.sh start [args]    # start in the background on our port, wait for PING -> PONG
#   scripts/redis.sh stop            # SIGTERM, wait for exit
#   scripts/redis.sh status
#
# Environment (defaults in brackets): REDIS_HOME [.run/redis] (pidfile, log, data),
# REDIS_PORT [6379], REDIS_ADDRESS [127.0.0.1], REDIS_BIN [redis-server on PATH].
# Extra arguments go to redis-server (e.g. --requirepass s3cret). Nothing is persisted to disk:
# shared gateway state is soft (leases expire, buckets refill).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
home=${REDIS_HOME:-$root/.run/redis}
port=${REDIS_PORT:-6379}
address=${REDIS_ADDRESS:-127.0.0.1}
pidfile=$home/redis-$port.pid
logfile=$home/redis-$port.log

name=redis
# shellcheck source=scripts/daemon.sh
. "$(dirname "$0")/daemon.sh"

redis_bin() {
  if [ -n "${REDIS_BIN:-}" ]; then echo "$REDIS_BIN"; return 0; fi
  command -v redis-server 2>/dev/null || { [ -x /usr/bin/redis-server ] && echo /usr/bin/redis-server; } || true
}

install() {
  if [ -n "$(redis_bin)" ]; then echo "redis: already installed ($("$(redis_bin)" --version))"; return 0; fi
  apt_install redis-server
  echo "redis: installed ($("$(redis_bin)" --version))"
}

# PING with bash alone (RESP inline command).
ready() {
  ( exec 3<>"/dev/tcp/$address/$port" || exit 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 line <&3 && [[ "$line" == "+PONG"* || "$line" == "-NOAUTH"* ]] ) 2>/dev/null
}

start() {
  [ -n "$(redis_bin)" ] || install
  mkdir -p "$home"
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then
    echo "redis: already running (pid $(cat "$pidfile"))"; return 0
  fi
  setsid "$(redis_bin)" --port "$port" --bind "$address" --dir "$home" --save '' --appendonly no \
    --daemonize no "$@" >"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  await_ready 100 0.1 "ready on redis://$address:$port (log $logfile)"
}

cmd=${1:-}; shift || true
case "$cmd" in
  install|start|stop|status) "$cmd" "$@" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
