#!/usr/bin/env bash
# Compile infergate's own .proto files (protos/infergate/v1/) into gateway/protocol/ with grpcio-tools.
# The generated modules are committed; tests/unit/test_protos.py fails when they are out of date.
#   scripts/protos.sh [OUT_DIR]     (default: gateway/protocol)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/gateway/protocol}
python=${PYTHON:-$root/.venv/bin/python}
"$python" -m grpc_tools.protoc -I "$root/protos/infergate/v1" --python_out="$out" "$root"/protos/infergate/v1/*.proto
