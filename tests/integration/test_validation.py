"""Edge validation through a real gateway in front of a real Triton: the classifier's schema comes
from Triton (features: FP32 [-1, 8], max_batch_size 32), value rules from the routing file; reject
mode refuses with INVALID_ARGUMENT / 400 naming tensor, element and rule, observe mode counts and
lets the request through."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import metric

RULES = {"max_batch": 4, "inputs": {"features": {"min": -10, "max": 10, "features": {7: {"allowed": [0, 1, 2]}}}}}
ROUTES = {
    "classifier": {"target": {"backend": "triton", "model": "classifier", "version": 2},
                   "validation": {"mode": "reject", **RULES}},
    "watched": {"target": {"backend": "triton", "model": "classifier", "version": 1},
                "validation": {"mode": "observe", **RULES}},
    "small": {"target": {"backend": "triton", "model": "double"}, "validation": {"max_request_bytes": 200}},
}


@pytest.fixture(scope="module")
def gw(triton, module_launcher):
    return module_launcher.start(triton.grpc_url, routes=ROUTES)


def rows(n: int = 2) -> np.ndarray:
    x = np.zeros((n, 8), np.float32)
    x[:, 7] = 1
    return x


def grpc_infer(gw, x: np.ndarray, model: str = "classifier", name: str = "features", datatype: str = "FP32") -> str:
    """'OK', or the error message the gateway answered with."""
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    try:
        client.infer(model, [tensor])
        return "OK"
    except InferenceServerException as e:
        assert e.status() == "StatusCode.INVALID_ARGUMENT", e
        return e.message()


def with_value(row: int, col: int, value: float) -> np.ndarray:
    x = rows()
    x[row, col] = value
    return x


@pytest.mark.parametrize("x, message", [
    (with_value(1, 3, np.nan), "input 'features' element [1, 3]: value nan is not finite (rule: finite)"),
    (with_value(0, 2, 11.0), "input 'features' element [0, 2]: value 11.0 is above max 10 (rule: max)"),
    (with_value(1, 0, -12.5), "input 'features' element [1, 0]: value -12.5 is below min -10 (rule: min)"),
    (with_value(1, 7, 5.0), "input 'features' element [1, 7]: 5.0 is not an allowed category (rule: features[7].allowed)"),
    (rows(5), "input 'features': batch size 5 is over max_batch 4 (rule: max_batch)"),
    (np.zeros((2, 7), np.float32), "input 'features': shape [2, 7], the model expects [-1, 8] (rule: schema.shape)"),
])
def test_reject_mode_names_tensor_element_and_rule(gw, x, message):
    assert message in grpc_infer(gw, x)


def test_schema_comes_from_triton(gw):
    assert "(rule: schema.datatype)" in grpc_infer(gw, rows().astype(np.float64), datatype="FP64")
    assert "the model has no such input (inputs: features) (rule: schema.unknown_input)" in grpc_infer(gw, rows(), name="x")
    assert grpc_infer(gw, rows()) == "OK"


def test_http_answers_400_with_the_same_message(gw):
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [0, 0, 0, 0, 0, 0, 0, 9]}]}
    request = urllib.request.Request(f"http://{gw.http_url}/v2/models/classifier/infer", data=json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"] == \
        "input 'features' element [0, 7]: 9.0 is not an allowed category (rule: features[7].allowed)"


def test_observe_mode_counts_and_lets_through(gw):
    before = metric(gw, "infergate_validation_violations_total", model="watched", rule="finite", mode="observe")
    assert grpc_infer(gw, with_value(0, 1, np.inf), model="watched") == "OK"
    assert metric(gw, "infergate_validation_violations_total", model="watched", rule="finite", mode="observe") == before + 1
    assert metric(gw, "infergate_validation_violations_total", model="classifier", input="features", mode="reject") >= 1


def test_request_size_limit(gw):
    assert grpc_infer(gw, np.ones((1, 4), np.float32), model="small", name="INPUT0") == "OK"
    assert "over max_request_bytes 200 (rule: max_request_bytes)" in grpc_infer(gw, np.ones((1, 64), np.float32),
                                                                                model="small", name="INPUT0")
