"""Unmodified tritonclient (gRPC and HTTP, JSON and binary) through the gateway: answers equal
Triton's own, and the rest of the protocol (metadata, config, ready, index, stats, streams)
behaves as Triton's does. Runs once per backend transport (unary calls, multiplexed streams)."""
from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import metric

FEATURES = np.random.default_rng(7).normal(size=(4, 8)).astype(np.float32)


@pytest.fixture(scope="module", params=["unary", "stream"])
def gw(request, triton, module_launcher):
    return module_launcher.start(triton.grpc_url, backend={"transport": request.param})


def grpc_infer(url: str, model: str, data: np.ndarray, name: str = "features", **kw) -> grpcclient.InferResult:
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor], **kw)


def http_infer(url: str, model: str, data: np.ndarray, binary: bool, name: str = "features", **kw) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    return client.infer(model, [tensor], outputs=outputs, **kw)


@pytest.mark.parametrize("public, version", [("classifier", "2"), ("classifier-v1", "1")])
def test_grpc_outputs_equal_direct(gw, triton, public, version):
    via = grpc_infer(gw.grpc_url, public, FEATURES, request_id="req-42")
    direct = grpc_infer(triton.grpc_url, "classifier", FEATURES, model_version=version)
    np.testing.assert_array_equal(via.as_numpy("probabilities"), direct.as_numpy("probabilities"))
    answer = via.get_response()
    assert (answer.model_name, answer.model_version, answer.id) == (public, version, "req-42")


def test_versions_differ_visibly(gw):
    v1 = grpc_infer(gw.grpc_url, "classifier-v1", FEATURES).as_numpy("probabilities")
    v2 = grpc_infer(gw.grpc_url, "classifier", FEATURES).as_numpy("probabilities")
    assert np.abs(v1 - v2).max() > 0.1


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_outputs_equal_direct(gw, triton, binary):
    via = http_infer(gw.http_url, "classifier", FEATURES, binary, request_id="h-1")
    direct = http_infer(triton.http_url, "classifier", FEATURES, binary, model_version="2")
    np.testing.assert_array_equal(via.as_numpy("probabilities"), direct.as_numpy("probabilities"))
    answer = via.get_response()
    assert answer["model_name"] == "classifier" and answer["model_version"] == "2" and answer["id"] == "h-1"


def test_http_default_outputs_and_large_payload(gw, triton):
    """No outputs named: tritonclient asks for all outputs in binary; 64 KiB tensors pass intact."""
    data = np.random.default_rng(1).normal(size=(1, 16384)).astype(np.float32)
    client = httpclient.InferenceServerClient(gw.http_url)
    tensor = httpclient.InferInput("INPUT0", [1, 16384], "FP32")
    tensor.set_data_from_numpy(data)
    np.testing.assert_array_equal(client.infer("double", [tensor]).as_numpy("OUTPUT0"), data * 2)


def test_grpc_large_payload(gw):
    data = np.random.default_rng(2).normal(size=(2, 16384)).astype(np.float32)
    np.testing.assert_array_equal(grpc_infer(gw.grpc_url, "double", data, name="INPUT0").as_numpy("OUTPUT0"), data * 2)


def test_grpc_stream_infer(gw):
    """ModelStreamInfer through the gateway: every answer arrives, matched by request id."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(20):
            tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.full((1, 4), i, np.float32))
            client.async_stream_infer("double", [tensor], request_id=f"s{i}")
        tensor = grpcclient.InferInput("INPUT0", [1, 4], "INT32")
        tensor.set_data_from_numpy(np.zeros((1, 4), np.int32))
        client.async_stream_infer("double", [tensor], request_id="bad")
        got = [answers.get(timeout=10) for _ in range(21)]
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "data-type is 'INT32'" in str(errors[0])
    results = {r.get_response().id: r.as_numpy("OUTPUT0") for r, e in got if e is None}
    assert sorted(results) == sorted(f"s{i}" for i in range(20))
    for i in range(20):
        np.testing.assert_array_equal(results[f"s{i}"], np.full((1, 4), 2 * i, np.float32))


def test_metadata_config_and_readiness(gw):
    g = grpcclient.InferenceServerClient(gw.grpc_url)
    h = httpclient.InferenceServerClient(gw.http_url)
    assert g.is_server_live() and g.is_server_ready() and h.is_server_live() and h.is_server_ready()
    assert g.is_model_ready("classifier") and h.is_model_ready("classifier-v1")
    assert not g.is_model_ready("nope") and not h.is_model_ready("nope") and not g.is_model_ready("classifier", "7")
    meta = h.get_model_metadata("classifier")
    assert meta["name"] == "classifier" and meta["versions"] == ["2"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
    assert g.get_model_metadata("classifier-v1").versions == ["1"]
    config = h.get_model_config("double")
    assert config["name"] == "double" and config["max_batch_size"] == 64 and config["input"][0]["dims"] == [-1]
    assert g.get_model_config("classifier-v1").config.name == "classifier-v1"
    assert g.get_server_metadata().name == "infergate"


def test_repository_index_and_statistics_show_public_names(gw):
    grpc_index = {(m.name, m.version) for m in grpcclient.InferenceServerClient(gw.grpc_url).get_model_repository_index().models}
    assert grpc_index == {("double", "1"), ("classifier", "2"), ("classifier-v1", "1"), ("slow", "1")}
    http_index = {(m["name"], m["version"]) for m in httpclient.InferenceServerClient(gw.http_url).get_model_repository_index()}
    assert http_index == grpc_index
    stats = httpclient.InferenceServerClient(gw.http_url).get_inference_statistics("classifier-v1")
    assert [(s["name"], s["version"]) for s in stats["model_stats"]] == [("classifier-v1", "1")]


def test_metrics_count_requests(gw):
    before = metric(gw, "infergate_requests_total", code="OK", model="double", protocol="grpc", target="primary")
    grpc_infer(gw.grpc_url, "double", np.ones((1, 4), np.float32), name="INPUT0")
    assert metric(gw, "infergate_requests_total", code="OK", model="double", protocol="grpc", target="primary") == before + 1


def test_stream_keeps_the_order_of_one_sequence(gw):
    """Requests of one sequence_id run in the order sent; others overtake them."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))

    def send(request_id: str, model: str, **sequence) -> None:
        name = "DELAY_MS" if model == "slow" else "INPUT0"
        tensor = grpcclient.InferInput(name, [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[300.0]], np.float32))
        client.async_stream_infer(model, [tensor], request_id=request_id, **sequence)

    try:  # a fast model answers long before the slow one, unless the sequence holds it back
        send("a1", "slow", sequence_id=42, sequence_start=True)
        send("a2", "double", sequence_id=42)
        send("b", "double")
        order = []
        for _ in range(3):
            result, error = answers.get(timeout=10)
            assert error is None, error
            order.append(result.get_response().id)
    finally:
        client.stop_stream()
    assert order.index("a1") < order.index("a2") and order.index("b") < order.index("a1"), order
