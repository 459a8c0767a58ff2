"""Hostile traffic from raw clients against a real gateway in front of a real Triton: every
malformed request gets the right code (HTTP 400 / 413, gRPC INVALID_ARGUMENT / RESOURCE_EXHAUSTED),
whoever answers it, and the gateway keeps serving. The last test checks the aftermath, so the
module runs top to bottom against one gateway."""
from __future__ import annotations

import http.client
import socket

import grpc
import numpy as np
import orjson
import pytest

from gateway.protocol.wire import pb

LIMIT = 65536  # the gateway's max_message_bytes
FOUR = np.arange(4, dtype=np.float32)
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def gw(triton, module_launcher):
    return module_launcher.start(triton.grpc_url, max_message_bytes=LIMIT)


@pytest.fixture(scope="module")
def channel(gw):
    with grpc.insecure_channel(gw.grpc_url) as ch:
        yield ch


def post(gw, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST an infer body as is; the status and the answer's bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
    try:
        conn.request("POST", "/v2/models/double/infer", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def infer_json(shape: object = (1, 4), data: object = FOUR.tolist(), **extra: object) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "data": data, **extra}]})


def binary_body(size: object, blob: bytes) -> tuple[bytes, int]:
    """A binary-extension body: the JSON header claiming `size` bytes, then `blob`; and the header's length."""
    header = orjson.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4],
                                       "parameters": {"binary_data_size": size}}]})
    return header + blob, len(header)


def deep(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


HTTP_400 = {
    "truncated JSON": infer_json()[:-3],
    "not UTF-8": b'{"inputs": "\xff\xfe"}',
    "JSON array, not object": b"[1, 2, 3]",
    "inputs not a list": b'{"inputs": {"name": "INPUT0"}}',
    "input not an object": b'{"inputs": [7]}',
    "id a nested array": b'{"id": ' + deep(1000) + b', "inputs": []}',
    "data nested 1000 deep": infer_json(data="DEEP").replace(b'"DEEP"', deep(1000)),
    "data nested past the parser": infer_json(data="DEEP").replace(b'"DEEP"', deep(5000)),
    "negative dimension": infer_json(shape=[-1, 4]),
    "huge dimension": infer_json(shape=[2**62, 4]),
    "dimension over int64": infer_json(shape=[2**64 - 1, 0]),
    "dimension a float": infer_json(shape=[1.0, 4]),
    "dimension a bool": infer_json(shape=[True, 4]),
    "nested shape": infer_json(shape=[[1], [4]]),
    "65 dimensions": infer_json(shape=[1] * 63 + [2, 2]),
    "fewer elements than the shape": infer_json(data=[1.0, 2.0, 3.0]),
    "more elements than the shape": infer_json(shape=[1, 2]),
    "elements of the wrong kind": infer_json(data=["1", "2", "3", "4"]),
    "unknown datatype": infer_json().replace(b'"FP32"', b'"FP33"'),
    "shared memory input": infer_json(parameters={"shared_memory_region": "r0"}),
    "parameter an object": infer_json(parameters={"p": {"q": 1}}),
    "binary_data_output a string": b'{"parameters": {"binary_data_output": "yes"}, "inputs": []}',
    "outputs malformed": b'{"inputs": [], "outputs": [{"name": 3}]}',
}


@pytest.mark.parametrize("case", HTTP_400)
def test_malformed_json_bodies_are_400(gw, case):
    status, answer = post(gw, HTTP_400[case])
    assert status == 400, answer
    assert orjson.loads(answer)["error"]


BLOB = FOUR.tobytes()
BINARY_400 = {
    "header length negative": (binary_body(16, BLOB), "-5"),
    "header length past the body": (binary_body(16, BLOB), "{past}"),
    "header length not a number": (binary_body(16, BLOB), "sixty"),
    "header length with underscores": (binary_body(16, BLOB), "{underscored}"),  # int() reads "9_9" as 99
    "header length huge": (binary_body(16, BLOB), "9" * 5000),
    "header length inside the JSON": (binary_body(16, BLOB), "10"),
    "binary_data_size past the body": (binary_body(1 << 40, BLOB), None),
    "binary_data_size negative": (binary_body(-16, BLOB), None),
    "binary_data_size a bool": (binary_body(True, BLOB), None),
    "binary_data_size a float": (binary_body(16.0, BLOB), None),
    "bytes short of the shape": (binary_body(12, BLOB[:12]), None),
    "bytes beyond the shape": (binary_body(20, BLOB + b"\0" * 4), None),
    "bytes left unclaimed": (binary_body(16, BLOB + b"\0" * 4), None),
}


@pytest.mark.parametrize("case", BINARY_400)
def test_lying_binary_extension_is_400(gw, case):
    (body, header_length), lie = BINARY_400[case]
    lie = (lie or str(header_length)).format(past=len(body) + 1, underscored="_".join(str(header_length)))
    status, answer = post(gw, body, {"Inference-Header-Content-Length": lie})
    assert status == 400, answer


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"POST /v2/models/double/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v2/models/double/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
], ids=["not HTTP", "negative Content-Length", "non-numeric Content-Length"])
def test_malformed_http_framing_is_400(gw, request_bytes):
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=10) as s:
        s.sendall(request_bytes)
        assert s.recv(64).split(b" ")[1] == b"400"


def test_body_over_the_limit_is_413(gw):
    status, body = post(gw, infer_json(id="x" * LIMIT))
    assert status == 413
    assert orjson.loads(body)["error"].startswith("Maximum request body size")


def grpc_code(channel: grpc.Channel, raw: bytes) -> grpc.StatusCode:
    """The code a raw ModelInfer call with these exact bytes gets."""
    call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
    try:
        call(raw, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def proto_request(shape: list[int], *raw: bytes, datatype: str = "FP32") -> bytes:
    request = pb.ModelInferRequest(model_name="double")
    request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw)
    return request.SerializeToString()


GRPC_INVALID = {
    "not protobuf": b"\xff\xff\xff\xff",
    "truncated message": proto_request([1, 4], BLOB)[:-5],
    "length past the end": b"\x0a\xff\xff\xff\x0fdouble",
    "bytes short of the shape": proto_request([1, 4], BLOB[:12]),
    "bytes beyond the shape": proto_request([1, 4], BLOB + BLOB),
    "negative dimension": proto_request([-1, 4], BLOB),
    "huge dimensions": proto_request([2**62, 2**62], BLOB),
    "raw entries beyond the inputs": proto_request([1, 4], BLOB, BLOB),
    "typed contents short of the shape": proto_request([1, 4]) + pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(contents=pb.InferTensorContents(fp32_contents=[1.0]))]).SerializeToString(),
    "unknown datatype": proto_request([1, 4], BLOB, datatype="FP33"),
    "BYTES lengths that lie": proto_request([1, 1], b"\xff\xff\xff\x7fabc", datatype="BYTES"),
}


@pytest.mark.parametrize("case", GRPC_INVALID)
def test_malformed_grpc_requests_are_invalid_argument(channel, case):
    assert grpc_code(channel, GRPC_INVALID[case]) == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_message_over_the_limit_is_resource_exhausted(channel):
    big = np.zeros(LIMIT // 4 + 16, np.float32)
    assert grpc_code(channel, proto_request([1, big.size], big.tobytes())) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_stream_answers_a_malformed_message_in_band_and_goes_on(channel):
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                   response_deserializer=pb.ModelStreamInferResponse.FromString)
    answers = list(stream(iter([b"\xff\xff\xff\xff", proto_request([1, 4], BLOB)]), timeout=10))
    assert sorted(bool(a.error_message) for a in answers) == [False, True]
    ok = next(a for a in answers if not a.error_message)
    assert np.frombuffer(ok.infer_response.raw_output_contents[0], np.float32).tolist() == (FOUR * 2).tolist()


def test_the_gateway_still_serves_after_the_hostile_traffic(gw, channel):
    status, answer = post(gw, infer_json())
    assert status == 200 and orjson.loads(answer)["outputs"][0]["data"] == (FOUR * 2).tolist()
    body, header_length = binary_body(16, BLOB)
    assert post(gw, body, {"Inference-Header-Content-Length": str(header_length)})[0] == 200
    assert grpc_code(channel, proto_request([1, 4], BLOB)) == grpc.StatusCode.OK
    assert gw.proc.poll() is None
    log = (gw.config_path.parent / "gateway.log").read_text()
    assert "unexpected error" not in log  # the gateway's mark of an exception other than a GatewayError
