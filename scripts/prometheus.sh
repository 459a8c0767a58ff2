#!/usr/bin/env bash
# Install and run a real Prometheus (Debian's package) for dashboards, alert rules and their tests.
#
#   scripts/prometheus.sh install          # apt-get install prometheus if prometheus/promtool are missing
#   scripts/prometheus.sh start [args]     # start in the background with our config, wait for /-/ready
#   scripts/prometheus.sh stop             # SIGTERM, wait for exit
#   scripts/prometheus.sh status
#   scripts/prometheus.sh promtool ARGS    # e.g. promtool check rules configs/prometheus/infergate-rules.yml
#
# Environment (defaults in brackets): PROMETHEUS_HOME [.run/prometheus] (pidfile, log),
# PROMETHEUS_CONFIG [configs/prometheus/prometheus.yml], PROMETHEUS_DATA [$PROMETHEUS_HOME/data-PORT],
# PROMETHEUS_PORT [9090], PROMETHEUS_ADDRESS [127.0.0.1], PROMETHEUS_RETENTION [1d],
# PROMETHEUS_BIN [prometheus on PATH], PROMTOOL_BIN [promtool on PATH].
#
# The package's own systemd unit plays no part: the install keeps it from starting (policy-rc.d),
# and `start` runs a process of ours, with our config, data dir and port, under a pidfile.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
home=${PROMETHEUS_HOME:-$root/.run/prometheus}
config=${PROMETHEUS_CONFIG:-$root/configs/prometheus/prometheus.yml}
port=${PROMETHEUS_PORT:-9090}
address=${PROMETHEUS_ADDRESS:-127.0.0.1}
data=${PROMETHEUS_DATA:-$home/data-$port}
retention=${PROMETHEUS_RETENTION:-1d}
pidfile=$home/prometheus-$port.pid
logfile=$home/prometheus-$port.log

# Running, and not a zombie left by a SIGKILL (kill -0 succeeds on zombies).
name=prometheus
# shellcheck source=scripts/daemon.sh
. "$(dirname "$0")/daemon.sh"

find_bin() { # name, override: the override if given, else PATH, else Debian's place; nothing if missing
  if [ -n "$2" ]; then if [ -x "$2" ]; then echo "$2"; fi; return 0; fi
  command -v "$1" 2>/dev/null || { [ -x "/usr/bin/$1" ] && echo "/usr/bin/$1"; } || true
}
prometheus_bin() { find_bin prometheus "${PROMETHEUS_BIN:-}"; }
promtool_bin() { find_bin promtool "${PROMTOOL_BIN:-}"; }

install() {
  if [ -n "$(prometheus_bin)" ] && [ -n "$(promtool_bin)" ]; then
    echo "prometheus: already installed ($("$(prometheus_bin)" --version 2>&1 | head -n1))"; return 0
  fi
  apt_install prometheus
  echo "prometheus: installed ($("$(prometheus_bin)" --version 2>&1 | head -n1))"
}

# GET /-/ready with bash alone (a fresh machine may have neither curl nor wget).
ready() {
  ( exec 3<>"/dev/tcp/$address/$port" || exit 1
    printf 'GET /-/ready HTTP/1.0\r\nHost: %s:%s\r\n\r\n' "$address" "$port" >&3
    IFS= read -r -t 2 line <&3 && [[ "$line" == *" 200 "* ]] ) 2>/dev/null
}

start() {
  [ -n "$(prometheus_bin)" ] || install
  mkdir -p "$home" "$data"
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then
    echo "prometheus: already running (pid $(cat "$pidfile"))"; return 0
  fi
  [ -r "$config" ] || { echo "prometheus: no config at $config" >&2; return 1; }
  setsid "$(prometheus_bin)" --config.file="$config" --storage.tsdb.path="$data" \
    --storage.tsdb.retention.time="$retention" --web.listen-address="$address:$port" \
    --web.enable-lifecycle "$@" >"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  await_ready 300 0.1 "ready on http://$address:$port (config $config, data $data, log $logfile)"
}


promtool() {
  [ -n "$(promtool_bin)" ] || install
  exec "$(promtool_bin)" "$@"
}

cmd=${1:-}; shift || true
case "$cmd" in
  install|start|stop|status|promtool) "$cmd" "$@" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
