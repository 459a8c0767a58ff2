# Sourced by triton-cpu.sh, prometheus.sh, redis.sh and postgres.sh: one background server with a pidfile and a log.
# The sourcing script sets $name (for messages), $pidfile and $logfile, and defines ready().

alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat")" != Z ]; }

# await_ready TRIES PAUSE MESSAGE: wait until ready() answers (say MESSAGE) or the process dies;
# on failure show the log's tail, stop what is left and return 1.
await_ready() {
  for _ in $(seq 1 "$1"); do
    if ready; then echo "$name: $3"; return 0; fi
    if ! alive "$(cat "$pidfile")"; then break; fi
    sleep "$2"
  done
  echo "$name: failed to become ready; last log lines:" >&2
  tail -n 30 "$logfile" >&2
  stop || true
  return 1
}

# stop: SIGTERM, up to 10 s for the exit, then SIGKILL.
stop() {
  [ -f "$pidfile" ] || { echo "$name: not running"; return 0; }
  local pid
  pid=$(cat "$pidfile")
  if alive "$pid"; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid"; fi
  fi
  rm -f "$pidfile"
  echo "$name: stopped"
}

# status: ready (pid), or "not running" and 1.
status() {
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")" && ready; then
    echo "$name: ready (pid $(cat "$pidfile"))"
  else
    echo "$name: not running"; return 1
  fi
}

# apt_install PACKAGE...: Debian packages whose services must not start on their own (they would
# take our ports and data dirs): invoke-rc.d and deb-systemd-invoke obey policy-rc.d, so one is put
# in place for the install when none exists, and a unit the package enabled is switched off.
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "$name: install needs root (or sudo)" >&2; return 1; }
    sudo="sudo"
  fi
  local policy=/usr/sbin/policy-rc.d ours="" rc=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# infergate scripts: no service starts during this install\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"; ours=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists (or stale ones): update once and try again.
  $sudo apt-get install -y --no-install-recommends "$@" \
    || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "$@"; } || rc=$?
  if [ -n "$ours" ]; then $sudo rm -f "$policy"; fi
  [ "$rc" = 0 ] || return "$rc"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    for unit in "$@"; do $sudo systemctl disable --now "$unit" >/dev/null 2>&1 || true; done
  fi
}
