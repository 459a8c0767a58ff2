"""The stream transport's byte-level matching: gateway ids out, caller ids back in."""
from __future__ import annotations

from gateway.backends.streams import _split, _with_id
from gateway.protocol.wire import pb, stream_error, stream_response


def test_split_finds_gateway_id_and_response():
    inner = pb.ModelInferResponse(model_name="m", model_version="1", id="ig42", raw_output_contents=[b"x" * 200])
    key, answer = _split(memoryview(stream_response(inner.SerializeToString())))
    assert key == "ig42" and pb.ModelInferResponse.FromString(bytes(answer)).raw_output_contents[0] == b"x" * 200


def test_split_marks_errors():
    assert _split(memoryview(stream_error("bad input", "ig7"))) == ("ig7", None)


def test_with_id_restores_callers_id_or_removes_it():
    inner = pb.ModelInferResponse(model_name="m", id="ig1", raw_output_contents=[b"y" * 150]).SerializeToString()
    restored = pb.ModelInferResponse.FromString(_with_id(memoryview(inner), "client-7"))
    assert restored.id == "client-7" and restored.model_name == "m" and restored.raw_output_contents[0] == b"y" * 150
    assert pb.ModelInferResponse.FromString(_with_id(memoryview(inner), "")).id == ""
