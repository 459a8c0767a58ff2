"""What the request path queues: records rendered from entries (digests, capture, redaction), and
the queue-full policies, against a real AuditLog whose writer is not started (so nothing drains)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from gateway.audit.trail import Auditor
from gateway.config import Audit
from gateway.dataplane import Call, Outcome
from gateway.errors import Unavailable
from gateway.observability.metrics import Metrics
from gateway.observability.trace import Trace
from gateway.protocol.wire import pb
from gateway.security.principal import Principal

METRICS = Metrics()  # one registry per process: the families exist once


def auditor(tmp_path: Path, **spec: object) -> Auditor:
    return Auditor(Audit(dir="audit", **spec), tmp_path, "w0", METRICS)


def call(subject: str = "", typed: bool = False) -> Call:
    """A request with raw tensors (INPUT0, FP32) or typed contents (INPUT0, FP32, and WORDS, BYTES):
    the protocol allows one form or the other in a request, not both."""
    request = pb.ModelInferRequest(model_name="double", id="r-1")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    if typed:
        tensor.contents.fp32_contents.extend([0.0, 1.0, 2.0, 3.0])
        request.inputs.add(name="WORDS", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"alpha", b"beta"])
    else:
        request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    request.parameters["ssn"].string_param = "078-05-1120"
    request.parameters["subject_id"].string_param = "from-parameter"
    headers = {"x-subject-id": subject} if subject else {}
    return Call("double", "", "r-1", request.SerializeToString(), "grpc", "ipv4:10.0.0.7", headers, request,
                Trace.from_headers({}), principal=Principal("svc-a", "jwt"))


def answered() -> Outcome:
    response = pb.ModelInferResponse(model_name="double")
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 4])
    response.raw_output_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return Outcome(model="double", target="primary", version="1", decision="weight", validation="passed",
                   response=response.SerializeToString(), config_version="abcdef123456")


def test_a_record_holds_digests_the_decision_and_the_subject(tmp_path):
    audit = auditor(tmp_path)
    c = call(subject="from-header")
    audit.infer(c, answered(), 0.0012)
    record = audit.log._queue[0][0].render()
    assert record["inputs"] == {"INPUT0": hashlib.sha256(np.arange(4, dtype=np.float32).tobytes()).hexdigest()}
    assert record["outputs"] == {"OUTPUT0": hashlib.sha256(np.arange(4, dtype=np.float32).tobytes()).hexdigest()}
    assert (record["principal"], record["via"], record["target"], record["version"], record["decision"]) == (
        "svc-a", "jwt", "primary", "1", "weight")
    assert (record["subject"], record["latency_ms"], record["config_version"]) == ("from-header", 1.2, "abcdef123456")
    assert record["trace_id"] == c.trace.trace_id and record["parent_span_id"] is None
    assert "payload" not in record  # capture is off by default


def test_the_subject_falls_back_to_the_request_parameter(tmp_path):
    audit = auditor(tmp_path)
    audit.infer(call(), answered(), 0.001)
    assert audit.log._queue[0][0].render()["subject"] == "from-parameter"


def test_typed_inputs_are_digested_as_their_deterministic_serialization(tmp_path):
    audit = auditor(tmp_path)
    c = call(typed=True)
    audit.infer(c, answered(), 0.001)
    assert audit.log._queue[0][0].render()["inputs"] == {
        t.name: hashlib.sha256(t.contents.SerializeToString(deterministic=True)).hexdigest() for t in c.request.inputs}


def test_capture_writes_tensors_and_parameters_with_redaction_and_a_size_cap(tmp_path):
    audit = auditor(tmp_path, capture={"rate": 1.0, "redact": ["ssn", "OUTPUT0"], "max_bytes": 15})
    audit.infer(call(), answered(), 0.001)
    payload = audit.log._queue[0][0].render()["payload"]
    assert payload["parameters"] == {"ssn": "[redacted]", "subject_id": "from-parameter"}
    assert payload["inputs"]["INPUT0"] == {"datatype": "FP32", "shape": [1, 4], "data": None, "truncated": True}
    assert payload["outputs"]["OUTPUT0"]["data"] == "[redacted]"
    audit.infer(call(typed=True), answered(), 0.001)
    typed = audit.log._queue[1][0].render()["payload"]["inputs"]
    assert typed["WORDS"]["data"] == ["alpha", "beta"] and typed["INPUT0"]["truncated"]


def test_drop_policy_counts_what_does_not_fit(tmp_path):
    audit = auditor(tmp_path, queue_size=16)
    before = METRICS.audit_drops._value.get()
    for _ in range(20):
        audit.admit()  # drop never refuses
        audit.infer(call(), answered(), 0.001)
    assert audit.log.depth == 16
    assert METRICS.audit_drops._value.get() - before == 4


def test_fail_closed_refuses_before_the_work_when_no_room_is_left(tmp_path):
    audit = auditor(tmp_path, queue_size=16, policy="fail_closed")
    for _ in range(10):
        audit.admit()
        audit.infer(call(), answered(), 0.001)
    for _ in range(6):
        audit.admit()  # six requests in flight hold the last six places
    with pytest.raises(Unavailable, match="audit log is not keeping up"):
        audit.admit()
    for _ in range(6):
        audit.infer(call(), answered(), 0.001)
    assert audit.log.depth == 16  # every admitted request's record was queued


def test_fail_closed_holds_places_that_shadow_and_refused_records_cannot_take(tmp_path):
    audit = auditor(tmp_path, queue_size=16, policy="fail_closed")
    c = call()
    for _ in range(16):
        audit.admit()
    audit.shadow(c, c.trace.child(), "double", "mirror", "1", "OK", "", 0.001, None, True)
    audit.refused(Trace.from_headers({}), "double", "grpc", "ipv4:10.0.0.7", Unavailable("x"), "", {})
    for _ in range(16):
        audit.infer(c, answered(), 0.001)
    kinds = [entry.render()["type"] for entry, _ in audit.log._queue]
    assert kinds == ["infer"] * 16  # every admitted request's record, the others dropped


def test_the_byte_budget_fills_the_queue_before_the_count_does(tmp_path):
    audit = auditor(tmp_path, max_queue_bytes=2**20)
    big = call()
    big.raw = b"x" * (2**19)  # what the entry holds on to
    for _ in range(3):
        audit.infer(big, answered(), 0.001)
    assert audit.log.depth == 2 and audit.log.full()


def test_a_captured_request_with_malformed_tensor_bytes_is_still_recorded(tmp_path):
    audit = auditor(tmp_path, capture={"rate": 1.0})
    c = call()
    c.request.raw_input_contents[0] = b"\x00" * 7  # not a whole FP32: check_layout refuses it
    audit.infer(c, answered(), 0.001)
    record = audit.log._queue[0][0].render()
    assert record["type"] == "infer" and record["request_id"] == "r-1"
    assert record["payload"]["inputs"]["INPUT0"]["undecodable"] is True
