"""Wire helpers, the HTTP JSON/binary codec and protobuf-to-JSON, without any server."""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from gateway.errors import InvalidArgument
from gateway.protocol import http_codec
from gateway.protocol.messages import to_json
from gateway.protocol.tensors import json_to_raw, raw_to_json, split_bytes
from gateway.protocol.wire import override, pb, stream_error, stream_response


def test_appended_override_renames_without_touching_tensors():
    request = pb.ModelInferRequest(model_name="public", id="abc")
    request.raw_input_contents.append(b"\x01" * 1000)
    raw = request.SerializeToString() + override(pb.ModelInferRequest, model_name="backend", model_version="3")
    parsed = pb.ModelInferRequest.FromString(raw)
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("backend", "3", "abc")
    assert parsed.raw_input_contents[0] == b"\x01" * 1000
    assert override(pb.ModelInferRequest, model_name="", model_version="") == b""


def test_stream_wrappers_parse_as_triton_messages():
    inner = pb.ModelInferResponse(model_name="m", id="x", raw_output_contents=[b"z" * 300]).SerializeToString()
    assert pb.ModelStreamInferResponse.FromString(stream_response(inner)).infer_response.id == "x"
    failed = pb.ModelStreamInferResponse.FromString(stream_error("boom", "r1"))
    assert (failed.error_message, failed.infer_response.id) == ("boom", "r1")


@pytest.mark.parametrize("datatype, data", [("FP32", [[1.5, 2.0], [3.0, 4.0]]), ("INT64", [1, -2, 3]),
                                            ("BOOL", [True, False]), ("UINT8", [0, 255]), ("FP16", [0.5, 1.5])])
def test_json_tensors_round_trip(datatype, data):
    raw = json_to_raw(datatype, data, "x")
    assert np.asarray(raw_to_json(datatype, raw)).tolist() == np.asarray(data).flatten().tolist()


def test_bytes_tensors_use_length_prefixes():
    raw = json_to_raw("BYTES", ["ab", "", "ü"], "x")
    assert raw == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xbc"
    assert split_bytes(raw) == [b"ab", b"", "ü".encode()]
    with pytest.raises(InvalidArgument, match="runs past the end"):
        split_bytes(b"\x09\x00\x00\x00ab")


def test_decode_binary_request_and_encode_binary_response():
    data = np.arange(6, dtype=np.float32)
    header = orjson.dumps({"id": "7", "parameters": {"priority": 2}, "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 6], "parameters": {"binary_data_size": 24}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]})
    request, plan = http_codec.decode_request(header + data.tobytes(), str(len(header)), "double", "1")
    assert (request.model_name, request.model_version, request.id) == ("double", "1", "7")
    assert request.parameters["priority"].int64_param == 2
    assert request.raw_input_contents[0] == data.tobytes() and list(request.inputs[0].shape) == [1, 6]
    assert "binary_data" not in request.outputs[0].parameters
    response = pb.ModelInferResponse(model_name="double", model_version="1", id="7")
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 6])
    response.raw_output_contents.append((data * 2).tobytes())
    body, length = http_codec.encode_response(response, plan)
    doc = orjson.loads(body[:length])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert np.frombuffer(body[length:], np.float32).tolist() == (data * 2).tolist()


def test_json_response_when_no_binary_asked():
    request, plan = http_codec.decode_request(orjson.dumps({"inputs": [
        {"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}), None, "m", "")
    assert np.frombuffer(request.raw_input_contents[0], np.int32).tolist() == [1, 2]
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="y", datatype="INT32", shape=[2])
    response.raw_output_contents.append(np.array([3, 4], np.int32).tobytes())
    body, length = http_codec.encode_response(response, plan)
    assert length is None and orjson.loads(body)["outputs"][0]["data"] == [3, 4]


def test_binary_data_output_request_parameter_makes_all_outputs_binary():
    _, plan = http_codec.decode_request(orjson.dumps({"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}), None, "m", "")
    assert plan.is_binary("anything")


@pytest.mark.parametrize("body, length, message", [
    (b"[1, 2]", None, "expected a JSON object"),
    (b"{}", None, "request has no 'inputs'"),
    (b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', None, "needs a string 'name'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": "1", "data": [1]}]}', None, "array of integers"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "neither 'data' nor 'binary_data_size'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}abcd', "-3", "Inference-Header-Content-Length"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}abcd', "74", "unclaimed"),
    (b'{"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1]}]}', None, "cannot be sent as JSON"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"p": [1]}}]}', None, "bool, number or string"),
])
def test_bad_bodies_are_invalid_argument(body, length, message):
    with pytest.raises(InvalidArgument, match=message):
        http_codec.decode_request(body, length, "m", "")


def test_to_json_prints_int64_as_numbers_and_skips_unset_messages():
    meta = pb.ModelMetadataResponse(name="m", versions=["1"], platform="python")
    meta.inputs.add(name="x", datatype="FP32", shape=[-1, 8])
    assert to_json(meta) == {"name": "m", "versions": ["1"], "platform": "python",
                             "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}], "outputs": []}
    stats = pb.ModelStatisticsResponse()
    stats.model_stats.add(name="m", inference_count=2**40)
    assert to_json(stats)["model_stats"][0]["inference_count"] == 2**40


def test_parameters_beyond_int64():
    body = orjson.dumps({"parameters": {"big": 2**63 + 5}, "inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]})
    request, _ = http_codec.decode_request(body, None, "m", "")
    assert request.parameters["big"].uint64_param == 2**63 + 5


@pytest.mark.parametrize("datatype, data, element", [
    ("FP32", [1.5, "2.5"], "element 1 is '2.5'"), ("INT32", [1, 2.5], "element 1 is 2.5"),
    ("INT32", [True], "element 0 is True"), ("BOOL", [1], "element 0 is 1"), ("BYTES", ["a", 3], "element 1 is 3"),
])
def test_json_elements_must_match_the_datatype(datatype, data, element):
    with pytest.raises(InvalidArgument, match=element):
        json_to_raw(datatype, data, "x")


def test_bf16_outputs_read_as_float32():
    from gateway.protocol.tensors import raw_to_json

    values = np.array([1.5, -2.0, 0.15625], np.float32)
    bf16 = (values.view("<u4") >> 16).astype("<u2").tobytes()
    assert raw_to_json("BF16", bf16).tolist() == [1.5, -2.0, 0.15625]
