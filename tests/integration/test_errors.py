"""Failures answer with the codes Triton itself uses, deadlines hold, a dead backend is UNAVAILABLE fast."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port

# (model, input name, shape, datatype) for each bad request; direct targets use Triton's own names
BAD_REQUESTS = {
    "unknown model": ("nope", "INPUT0", [1, 16], "FP32"),
    "wrong dtype": ("double", "INPUT0", [1, 16], "INT32"),
    "wrong shape": ("classifier", "features", [1, 7], "FP32"),
    "wrong input name": ("double", "BAD", [1, 16], "FP32"),
}


@pytest.fixture(scope="module")
def gw(triton, module_launcher):
    routes = {"double": {"target": {"backend": "triton", "model": "double"}},
              "classifier": {"target": {"backend": "triton", "model": "classifier"}},
              "slow": {"target": {"backend": "triton", "model": "slow"}}}
    return module_launcher.start(triton.grpc_url, routes=routes)


def _array(shape: list[int], datatype: str) -> np.ndarray:
    return np.ones(shape, np.int32 if datatype == "INT32" else np.float32)


def grpc_error(url: str, model: str, name: str, shape: list[int], datatype: str) -> tuple[str, str]:
    tensor = grpcclient.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(_array(shape, datatype))
    with pytest.raises(InferenceServerException) as e:
        grpcclient.InferenceServerClient(url).infer(model, [tensor])
    return e.value.status(), e.value.message()


def http_error(url: str, model: str, name: str, shape: list[int], datatype: str, binary: bool) -> tuple[str, str]:
    tensor = httpclient.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(_array(shape, datatype), binary_data=binary)
    with pytest.raises(InferenceServerException) as e:
        httpclient.InferenceServerClient(url).infer(model, [tensor])
    return e.value.status(), e.value.message()


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_grpc_codes_and_messages_match_triton(gw, triton, case):
    via = grpc_error(gw.grpc_url, *BAD_REQUESTS[case])
    direct = grpc_error(triton.grpc_url, *BAD_REQUESTS[case])
    assert via == direct
    assert via[0] in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_http_statuses_match_triton(gw, triton, case, binary):
    via = http_error(gw.http_url, *BAD_REQUESTS[case], binary)
    direct = http_error(triton.http_url, *BAD_REQUESTS[case], binary)
    assert via[0] == direct[0] and via[0] in ("400", "404")
    assert via[1] == direct[1]


@pytest.mark.parametrize("transport", ["unary", "stream"])
def test_client_deadline_becomes_deadline_exceeded_on_time(triton, start_gateway, transport):
    gw = start_gateway(triton.grpc_url, backend={"transport": transport})
    tensor = grpcclient.InferInput("DELAY_MS", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1500]], np.float32))
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        grpcclient.InferenceServerClient(gw.grpc_url).infer("slow", [tensor], client_timeout=0.3)
    elapsed = time.monotonic() - start
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert elapsed < 1.0, f"took {elapsed:.2f}s for a 0.3s deadline"


def test_route_timeout_applies_without_client_deadline(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes={"slow": {"target": {"backend": "triton", "model": "slow"}, "timeout_s": 0.3}})
    tensor = grpcclient.InferInput("DELAY_MS", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1500]], np.float32))
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        grpcclient.InferenceServerClient(gw.grpc_url).infer("slow", [tensor])
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - start < 1.0
    client = httpclient.InferenceServerClient(gw.http_url)
    http_tensor = httpclient.InferInput("DELAY_MS", [1, 1], "FP32")
    http_tensor.set_data_from_numpy(np.array([[1500]], np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("slow", [http_tensor])
    assert e.value.status() == "504"


@pytest.mark.parametrize("transport", ["unary", "stream"])
def test_backend_not_running_is_unavailable_fast(start_gateway, transport):
    gw = start_gateway(f"127.0.0.1:{free_port()}", wait_ready=False,
                       backend={"transport": transport, "connect_timeout_s": 1})
    for _ in range(3):  # first call connects, later ones find the channel already failing
        start = time.monotonic()
        status, _ = grpc_error(gw.grpc_url, "double", "INPUT0", [1, 4], "FP32")
        assert status == "StatusCode.UNAVAILABLE"
        assert time.monotonic() - start < 1.0
    status, _ = http_error(gw.http_url, "double", "INPUT0", [1, 4], "FP32", True)
    assert status == "503"
    assert not grpcclient.InferenceServerClient(gw.grpc_url).is_server_ready()


def test_malformed_grpc_message_is_invalid_argument(gw):
    channel = grpc.insecure_channel(gw.grpc_url)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as e:
        infer(b"\xff\xff\xff\xff garbage", timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("body, headers, fragment", [
    (b"{not json", {}, "failed to parse"),
    (b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 99}}]}',
     {}, "binary_data_size"),
    (b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, -4], "data": [1, 2, 3, 4]}]}', {}, "negative"),
    (b'{"inputs": []}xxxx', {"Inference-Header-Content-Length": "9999"}, "Inference-Header-Content-Length"),
    (b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": ["a", "b"]}]}', {}, "unable to parse"),
])
def test_malformed_http_bodies_are_400(gw, body, headers, fragment):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{gw.http_url}/v2/models/double/infer", data=body, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=5)
    assert e.value.code == 400
    assert fragment in e.value.read().decode()


def test_oversized_messages_are_refused(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, max_message_bytes=4096)
    big = np.ones((1, 2048), np.float32)  # 8 KiB of tensor data
    tensor = grpcclient.InferInput("INPUT0", [1, 2048], "FP32")
    tensor.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as e:
        grpcclient.InferenceServerClient(gw.grpc_url).infer("double", [tensor])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    http_tensor = httpclient.InferInput("INPUT0", [1, 2048], "FP32")
    http_tensor.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as e:
        httpclient.InferenceServerClient(gw.http_url).infer("double", [http_tensor])
    assert e.value.status() == "413"
