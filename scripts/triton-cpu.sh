#!/usr/bin/env bash
# Install and run a real Triton Inference Server on CPU from the nvidia-pytriton wheel.
#
#   scripts/triton-cpu.sh install            # server venv, python backend dir, perf_analyzer libs
#   scripts/triton-cpu.sh start [extra args] # start in the background, wait until ready
#   scripts/triton-cpu.sh stop               # SIGTERM, wait for exit
#   scripts/triton-cpu.sh status
#   scripts/triton-cpu.sh perf_analyzer ARGS # the perf_analyzer bundled in tritonclient 2.51
#
# Environment (defaults in brackets): TRITON_HOME [.triton], TRITON_VENV [.venv-triton],
# TRITON_MODELS [models], TRITON_HTTP_PORT [8000], TRITON_GRPC_PORT [8001],
# TRITON_METRICS_PORT [8002], TRITON_ADDRESS [127.0.0.1], PYTHON [python3.11 or python3].
#
# The two traps from running tritonserver out of the wheel are handled here:
#  1. LD_LIBRARY_PATH starts with the libdir of the CPython the venv was made from, then the
#     wheel's bundled libs (else the python-backend stub links a different libpython).
#  2. PATH starts with the server venv's bin/ (the stub finds numpy<2 through PATH; numpy 2
#     makes it return empty outputs).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
home=${TRITON_HOME:-$root/.triton}
venv=${TRITON_VENV:-$root/.venv-triton}
models=${TRITON_MODELS:-$root/models}
http_port=${TRITON_HTTP_PORT:-8000}
grpc_port=${TRITON_GRPC_PORT:-8001}
metrics_port=${TRITON_METRICS_PORT:-8002}
address=${TRITON_ADDRESS:-127.0.0.1}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
pidfile=$home/tritonserver-$http_port.pid
logfile=$home/tritonserver-$http_port.log

# Running, and not a zombie left by a SIGKILL (kill -0 succeeds on zombies).
name=triton-cpu
# shellcheck source=scripts/daemon.sh
. "$(dirname "$0")/daemon.sh"

site() { "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

install() {
  mkdir -p "$home"
  if [ ! -x "$venv/bin/python" ]; then "$python" -m venv "$venv"; fi
  if ! "$venv/bin/python" -c 'import pytriton, tritonclient' 2>/dev/null; then
    "$venv/bin/pip" install -q --disable-pip-version-check \
      "nvidia-pytriton==0.7.0" "numpy<2" "tritonclient[grpc,http]==2.51.0"
  fi
  local sp pyver
  sp=$(site)
  pyver=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  rm -rf "$home/backends" && mkdir -p "$home/backends"
  cp -r "$sp/pytriton/tritonserver/backends/python" "$home/backends/python"
  cp "$sp/pytriton/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub" \
     "$home/backends/python/triton_python_backend_stub"
  # perf_analyzer needs these two under their plain names.
  mkdir -p "$home/palibs"
  ln -sf "$(ls "$sp"/nvidia_pytriton.libs/libb64-*.so.0d | head -n1)" "$home/palibs/libb64.so.0d"
  ln -sf "$(ls "$sp"/nvidia_pytriton.libs/libcudart-*.so.12* | head -n1)" "$home/palibs/libcudart.so.12"
  echo "triton-cpu: installed in $venv, backends in $home/backends"
}

server_env() {
  local sp libdir
  sp=$(site)
  libdir=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
  export LD_LIBRARY_PATH="$libdir:$sp/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="$venv/bin:$PATH"
  unset PYTHONPATH
}

ready() {
  "$venv/bin/python" -c 'import sys, urllib.request
try: urllib.request.urlopen(sys.argv[1], timeout=1)
except Exception: sys.exit(1)' "http://$address:$http_port/v2/health/ready"
}

start() {
  [ -d "$home/backends/python" ] || install
  if [ -f "$pidfile" ] && alive "$(cat "$pidfile")"; then
    echo "triton-cpu: already running (pid $(cat "$pidfile"))"; return 0
  fi
  server_env
  setsid "$(site)/pytriton/tritonserver/bin/tritonserver" --model-repository="$models" --backend-directory="$home/backends" \
    --http-address="$address" --http-port="$http_port" \
    --grpc-address="$address" --grpc-port="$grpc_port" \
    --metrics-address="$address" --metrics-port="$metrics_port" \
    --allow-gpu-metrics=false --log-verbose=0 "$@" >"$logfile" 2>&1 &
  echo $! >"$pidfile"
  await_ready 150 0.2 "ready on http $http_port, grpc $grpc_port, metrics $metrics_port (log $logfile)"
}


perf_analyzer() {
  [ -d "$home/palibs" ] || install
  LD_LIBRARY_PATH="$home/palibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$venv/bin/perf_analyzer" "$@"
}

cmd=${1:-}; shift || true
case "$cmd" in
  install|start|stop|status|perf_analyzer) "$cmd" "$@" ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
