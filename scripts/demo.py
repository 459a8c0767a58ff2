"""Real traffic through a running gateway (make demo): gRPC and HTTP, two model versions, outcomes
posted back, an error, then where to look next."""
from __future__ import annotations

import sys
import time
import urllib.request
from collections import Counter

import numpy as np
import orjson
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gateway.routing.report import table_lines

GRPC, HTTP, ADMIN = "127.0.0.1:9001", "127.0.0.1:9000", "http://127.0.0.1:9002"


def main() -> int:
    g = grpcclient.InferenceServerClient(GRPC)
    h = httpclient.InferenceServerClient(HTTP)
    print(f"gateway: {g.get_server_metadata().name} {g.get_server_metadata().version}, ready={g.is_server_ready()}")
    print("published models:", ", ".join(f"{m.name} (v{m.version} {m.state})" for m in g.get_model_repository_index().models))

    features = np.array([[0.2, -1.0, 0.5, 1.5, -0.3, 0.8, 0.0, 1.1]], np.float32)
    tensor = grpcclient.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(features)
    for headers in ({}, {"x-infergate-target": "v2"}):
        result = g.infer("classifier", [tensor], headers=headers)
        print(f"gRPC  classifier {headers or ''} -> version {result.get_response().model_version}: "
              f"probabilities {np.round(result.as_numpy('probabilities'), 4)}")
    served = Counter(g.infer("classifier", [tensor]).get_response().model_version for _ in range(200))
    print(f"gRPC  classifier x200 (90/10 canary) -> versions served: {dict(sorted(served.items()))}")
    sticky = {g.infer("classifier", [tensor], headers={"x-user-id": "alice"}).get_response().model_version for _ in range(20)}
    print(f"gRPC  classifier x20 as x-user-id=alice (sticky) -> versions served: {sorted(sticky)}")

    rng = np.random.default_rng(0)
    run = f"demo-{time.time_ns()}"  # request ids are unique per model while the store keeps them
    for i in range(40):  # answers to post outcomes for: each request names its id and a region
        tensor.set_data_from_numpy(rng.normal(size=(1, 8)).astype(np.float32))
        g.infer("classifier", [tensor], request_id=f"{run}-{i}", headers={"x-region": ("eu", "us")[i % 2]})
    posted = [{"id": f"{run}-{i}", "label": int(rng.integers(0, 3)), "business": {"converted": bool(i % 3)}}
              for i in range(40)] + [{"id": "never-sent", "label": 0}]
    answer = orjson.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://{HTTP}/v2/models/classifier/feedback", orjson.dumps({"outcomes": posted}),
        {"Content-Type": "application/json"})).read())
    print(f"HTTP  classifier feedback x{len(posted)} -> joined {answer['joined']}, statuses "
          f"{dict(Counter(r['status'] for r in answer['results']))}")

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
    wanted = ("infergate_requests_total", "infergate_shadow_requests_total", "infergate_route_weight",
              "infergate_validation_violations_total", "infergate_access_decisions_total",
              "infergate_outcome_feedback_total")
    print("metrics:", *[l for l in metrics.splitlines() if l.startswith(wanted)], sep="\n  ")
    print("\nlive routes (infergate routes):")
    print("\n".join("  " + line for line in table_lines(orjson.loads(urllib.request.urlopen(f"{ADMIN}/admin/routes").read()))))
    print(f"""
Where to look next:
  metrics              curl {ADMIN}/metrics
  gateway log          .run/gateway.log      (Triton's: .triton/tritonserver-8000.log)
  routes               configs/routing.yaml  (edit it: the gateway reloads; docs/routing.md)
  live route table     .venv/bin/infergate routes
  outcomes by segment  .venv/bin/infergate report segments --model classifier   (docs/outcomes.md)
  model card           .venv/bin/infergate model-card --model classifier --version 2
  load                 scripts/triton-cpu.sh perf_analyzer -m double -u {GRPC} -i grpc --shape INPUT0:16
  benchmark            make bench            (results in bench/RESULTS.md)
  stop everything      make demo-down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
