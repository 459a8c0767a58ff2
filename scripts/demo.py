"""Real traffic through a running gateway (make demo): gRPC and HTTP, two model versions, an error,
then where to look next."""
from __future__ import annotations

import sys
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

GRPC, HTTP, ADMIN = "127.0.0.1:9001", "127.0.0.1:9000", "http://127.0.0.1:9002"


def main() -> int:
    g = grpcclient.InferenceServerClient(GRPC)
    h = httpclient.InferenceServerClient(HTTP)
    print(f"gateway: {g.get_server_metadata().name} {g.get_server_metadata().version}, ready={g.is_server_ready()}")
    print("published models:", ", ".join(f"{m.name} (v{m.version} {m.state})" for m in g.get_model_repository_index().models))

    features = np.array([[0.2, -1.0, 0.5, 1.5, -0.3, 0.8, 0.0, 1.1]], np.float32)
    for model in ("classifier-v1", "classifier"):
        tensor = grpcclient.InferInput("features", [1, 8], "FP32")
        tensor.set_data_from_numpy(features)
        result = g.infer(model, [tensor], request_id=f"demo-{model}")
        answer = result.get_response()
        print(f"gRPC  {model:14s} -> version {answer.model_version}: probabilities {np.round(result.as_numpy('probabilities'), 4)}")

    data = np.arange(8, dtype=np.float32)[None]
    for binary in (True, False):
        tensor = httpclient.InferInput("INPUT0", [1, 8], "FP32")
        tensor.set_data_from_numpy(data, binary_data=binary)
        out = h.infer("double", [tensor], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
        print(f"HTTP  double ({'binary' if binary else 'JSON'} tensors) -> {out.as_numpy('OUTPUT0').tolist()}")

    try:
        g.infer("no-such-model", [grpcclient.InferInput("x", [1], "FP32")])
    except InferenceServerException as e:
        print(f"gRPC  no-such-model -> {e.status()}: {e.message()}")

    metrics = urllib.request.urlopen(f"{ADMIN}/metrics").read().decode()
    print("metrics:", *[l for l in metrics.splitlines() if l.startswith("infergate_requests_total")], sep="\n  ")
    print(f"""
Where to look next:
  metrics              curl {ADMIN}/metrics
  gateway log          .run/gateway.log      (Triton's: .triton/tritonserver-8000.log)
  routes               configs/routing.yaml  (check with: .venv/bin/infergate check-config)
  load                 scripts/triton-cpu.sh perf_analyzer -m double -u {GRPC} -i grpc --shape INPUT0:16
  benchmark            make bench            (results in bench/RESULTS.md)
  stop everything      make demo-down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
