# Sourced by triton-cpu.sh and prometheus.sh: one background server with a pidfile and a log.
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
