"""Rate limits: a burst above the limit gets RESOURCE_EXHAUSTED / 429 with Retry-After at once,
traffic under the limit (and on other models) is untouched, and limits reload with the file."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import yaml

from gateway.protocol.wire import pb, pb_grpc
from tests.conftest import metric

DOUBLE = {"target": {"backend": "triton", "model": "double"}}


def grpc_double(stub: pb_grpc.GRPCInferenceServiceStub, model: str = "double") -> tuple[grpc.StatusCode, dict]:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    try:
        _, call = stub.ModelInfer.with_call(request, timeout=5)
        return call.code(), {}
    except grpc.RpcError as e:
        return e.code(), dict(e.trailing_metadata() or ())


def http_double(url: str, model: str = "double") -> tuple[int, dict]:
    body = b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body), timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_model_limit_refuses_the_burst_and_spares_other_models(triton, start_gateway):
    routes = {"double": {**DOUBLE, "rate_limit": {"rate": 2, "burst": 5}}, "free": DOUBLE}
    gw = start_gateway(triton.grpc_url, routes=routes)
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc_url))
    codes = [grpc_double(stub) for _ in range(8)]
    assert [c for c, _ in codes[:5]] == [grpc.StatusCode.OK] * 5
    refused = [(c, m) for c, m in codes[5:]]
    assert all(c == grpc.StatusCode.RESOURCE_EXHAUSTED and m.get("retry-after") == "1" for c, m in refused)
    status, headers = http_double(gw.http_url)
    assert status == 429 and headers["Retry-After"] == "1"
    assert [grpc_double(stub, "free")[0] for _ in range(20)] == [grpc.StatusCode.OK] * 20
    time.sleep(0.6)  # 2/s: one unit leaks out every 0.5 s
    assert grpc_double(stub)[0] == grpc.StatusCode.OK
    assert metric(gw, "infergate_rate_limited_total", model="double", scope="model") == 4  # 3 gRPC + 1 HTTP
    assert metric(gw, "infergate_requests_total", model="double", code="RESOURCE_EXHAUSTED") == 4
    assert metric(gw, "infergate_request_bytes_count", model="free", protocol="grpc") == 20
    assert metric(gw, "infergate_backend_duration_seconds_count", backend="triton", model="free") == 20
    assert metric(gw, "infergate_in_flight", model="free") == 0


def test_per_client_and_global_limits_and_reload(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes={"double": DOUBLE})
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc_url))
    assert [grpc_double(stub)[0] for _ in range(30)] == [grpc.StatusCode.OK] * 30  # no limits yet
    path = gw.config_path.parent / "routing.yaml"
    path.write_text(yaml.safe_dump({"models": {"double": DOUBLE}, "limits": {"per_client": {"rate": 1, "burst": 3}}}))
    time.sleep(1.0)
    codes = [grpc_double(stub)[0] for _ in range(5)]
    assert codes[:3] == [grpc.StatusCode.OK] * 3 and codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    path.write_text(yaml.safe_dump({"models": {"double": DOUBLE}, "limits": {"global": {"rate": 1, "burst": 2}}}))
    time.sleep(1.0)
    statuses = [http_double(gw.http_url)[0] for _ in range(4)]
    assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]


@pytest.mark.parametrize("limit, reason", [({"rate": 0}, "greater than 0"), ({"rate": 1, "burst": 0}, "greater than or equal to 1")])
def test_bad_limits_are_rejected(tmp_path, limit, reason):
    from tests.unit.test_config import GATEWAY, problems, write

    routing = yaml.safe_dump({"models": {"double": {**DOUBLE, "rate_limit": limit}}})
    found = problems(write(tmp_path, GATEWAY, routing))
    assert any("rate_limit" in p and reason in p for p in found), found


async def test_concurrency_cap_sheds_what_cannot_finish_in_time(triton, start_gateway):
    import asyncio

    import tritonclient.grpc.aio as grpc_aio
    from tritonclient.utils import InferenceServerException

    gw = start_gateway(triton.grpc_url, routes={"slow": {"target": {"backend": "triton", "model": "slow"},
                                                         "concurrency": {"max_in_flight": 2, "max_wait_s": 1.5}}})
    client = grpc_aio.InferenceServerClient(gw.grpc_url)

    async def slow(delay_ms: float, timeout: float) -> tuple[str, float]:
        tensor = grpc_aio.InferInput("DELAY_MS", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[delay_ms]], np.float32))
        start = time.perf_counter()
        try:
            await client.infer("slow", [tensor], client_timeout=timeout)
            return "OK", time.perf_counter() - start
        except InferenceServerException as e:
            return e.status(), time.perf_counter() - start

    for _ in range(2):  # the cap learns the service time (about 300 ms)
        assert (await slow(300, 5))[0] == "OK"
    within = await asyncio.gather(*(slow(300, 2.0) for _ in range(4)))  # the line fits the deadline
    assert [kind for kind, _ in within] == ["OK"] * 4
    tight = await asyncio.gather(*(slow(300, 0.25) for _ in range(6)))
    shed_at_once = [s for kind, s in tight if kind == "StatusCode.UNAVAILABLE" and s < 0.1]
    assert len(shed_at_once) >= 3, tight                # refused at once: their wait could not fit
    assert all(s < 0.25 + 0.15 for _, s in tight)       # nobody waited past the deadline
    await client.close()
