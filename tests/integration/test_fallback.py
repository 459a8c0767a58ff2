"""Fallback rules answer, marked as degraded, when the backend cannot: a backend that is not
running, and a model version Triton does not have. (Breakers arrive with the rest of issue #4.)"""
from __future__ import annotations

import json
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.protocol.wire import pb, pb_grpc
from tests.conftest import free_port, metric

FALLBACK = {
    "features": {"age": {"input": "features", "index": 0}},
    "outputs": {"probabilities": "FP32"},
    "rules": [{"name": "senior", "when": "age >= 65.0", "outputs": {"probabilities": [0.1, 0.1, 0.8]}}],
    "default": {"name": "default", "outputs": {"probabilities": [0.34, 0.33, 0.33]}},
}


def ask(url: str, age: float) -> tuple[pb.ModelInferResponse, dict[str, str]]:
    request = pb.ModelInferRequest(model_name="classifier", id="fb-1")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(np.array([[age] + [0.0] * 7], np.float32).tobytes())
    with grpc.insecure_channel(url) as channel:
        answer, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=5)
    return answer, dict(call.trailing_metadata())


def test_backend_down_answers_from_rules_on_both_protocols(start_gateway):
    gw = start_gateway(f"127.0.0.1:{free_port()}", wait_ready=False,
                       routes={"classifier": {"target": {"backend": "triton", "model": "classifier"}, "fallback": FALLBACK}})
    start = time.monotonic()
    answer, trailers = ask(gw.grpc_url, 70)
    assert time.monotonic() - start < 1.0
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [np.float32(0.1), np.float32(0.1), np.float32(0.8)]
    assert answer.parameters["infergate_fallback"].string_param == "senior" and answer.id == "fb-1"
    assert trailers["infergate-fallback"] == "senior" and trailers["infergate-target"] == "fallback"
    body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [30.0] + [0.0] * 7}]})
    with urllib.request.urlopen(urllib.request.Request(f"http://{gw.http_url}/v2/models/classifier/infer", data=body.encode())) as r:
        doc = json.loads(r.read())
        assert r.headers["infergate-fallback"] == "default"
    assert doc["parameters"] == {"infergate_fallback": "default"}
    assert doc["outputs"][0]["data"] == pytest.approx([0.34, 0.33, 0.33])
    assert metric(gw, "infergate_fallback_answers_total", model="classifier", cause="UNAVAILABLE") == 2


def test_missing_model_version_answers_from_rules_and_real_answers_do_not(triton, start_gateway):
    routes = {"classifier": {"target": {"backend": "triton", "model": "classifier", "version": 9}, "fallback": FALLBACK},
              "classifier-v1": {"target": {"backend": "triton", "model": "classifier", "version": 1}, "fallback": FALLBACK}}
    gw = start_gateway(triton.grpc_url, routes=routes)
    answer, trailers = ask(gw.grpc_url, 20)
    assert answer.parameters["infergate_fallback"].string_param == "default"
    assert metric(gw, "infergate_fallback_answers_total", model="classifier", cause="NOT_FOUND") == 1
    tensor = grpcclient.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 8), np.float32))
    real = grpcclient.InferenceServerClient(gw.grpc_url).infer("classifier-v1", [tensor]).get_response()
    assert "infergate_fallback" not in real.parameters and real.model_version == "1"
