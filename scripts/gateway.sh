#!/usr/bin/env bash
# Start or stop the gateway in the background with configs/gateway.yaml (or $GATEWAY_CONFIG).
#   scripts/gateway.sh start | stop | status
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
config=${GATEWAY_CONFIG:-$root/configs/gateway.yaml}
run=$root/.run
pidfile=$run/gateway.pid
admin=${GATEWAY_ADMIN:-http://127.0.0.1:9002}

ready() { "$root/.venv/bin/python" -c 'import sys, urllib.request
try: urllib.request.urlopen(sys.argv[1], timeout=1)
except Exception: sys.exit(1)' "$admin/ready"; }

case "${1:-}" in
  start)
    mkdir -p "$run"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "gateway: already running"; exit 0; fi
    "$root/.venv/bin/infergate" check-config --config "$config"
    setsid "$root/.venv/bin/infergate" serve --config "$config" >"$run/gateway.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 100); do
      if ready; then echo "gateway: ready (http 9000, grpc 9001, admin 9002; log $run/gateway.log)"; exit 0; fi
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
      sleep 0.2
    done
    echo "gateway: failed to become ready:" >&2; tail -n 20 "$run/gateway.log" >&2; exit 1 ;;
  stop)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      kill -TERM "$(cat "$pidfile")"
      for _ in $(seq 1 150); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"; echo "gateway: stopped" ;;
  status)
    if ready; then echo "gateway: ready"; else echo "gateway: not ready"; exit 1; fi ;;
  *) sed -n '2,3p' "$0"; exit 2 ;;
esac
