"""Audit through a real gateway in front of a real Triton: every kind of request leaves exactly
the right record (success on both protocols, each error class, a fallback answer, a shadow call),
trace context goes in, on to Triton and back out, the log verifies, and a SIGKILL under load
loses no record of an answered request older than the fsync interval."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.protocol.wire import SERVICE, pb, pb_grpc
from tests.conftest import ROOT, TRITON_SCRIPT, free_port, metric
from tests.integration.test_fallback import FALLBACK

ISSUER, AUDIENCE = "https://idp.infergate.test/", "infergate"
TRACE_ID, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
ROUTES = {
    "double": {"targets": {"primary": {"backend": "triton", "model": "double", "weight": 100},
                           "mirror": {"backend": "triton", "model": "double", "version": 1, "weight": 0}},
               "shadows": [{"target": "mirror", "rate": 1.0}]},
    "classifier": {"target": {"backend": "triton", "model": "classifier", "version": 2},
                   "validation": {"inputs": {"features": {"min": -10, "max": 200}}}},
    "rules": {"target": {"backend": "down", "model": "classifier"}, "fallback": FALLBACK},
    "limited": {"target": {"backend": "triton", "model": "double"}, "rate_limit": {"rate": 0.01, "burst": 1}},
    "secret": {"target": {"backend": "triton", "model": "double"}},
    "hurried": {"target": {"backend": "triton", "model": "slow"}, "timeout_s": 0.05},
}
OPEN = ["double", "classifier", "rules", "limited", "hurried"]
ACCESS = [{"name": "public", "anonymous": True, "models": OPEN, "actions": ["infer", "metadata"]},
          {"name": "services", "principals": ["svc-*"], "models": OPEN, "actions": ["infer", "metadata"]},
          {"name": "vip", "principals": ["svc-a"], "models": ["secret"], "actions": ["infer"]},
          {"name": "root", "principals": ["svc-root"], "actions": ["infer"]}]


class Idp:
    """An OIDC issuer of the test's own: one EC key, its JWKS file, tokens on demand."""

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key())), "kid": "k1", "use": "sig"}
        self.jwks = directory / "jwks.json"
        self.jwks.write_text(json.dumps({"keys": [jwk]}))

    def token(self, sub: str) -> str:
        now = int(time.time())
        return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600}, self.key,
                          algorithm="ES256", headers={"kid": "k1"})


def audit_section(directory: Path, **extra: object) -> dict:
    return {"dir": str(directory), "fsync_interval_s": 0.2, **extra}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Idp:
    return Idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def audited(triton, module_launcher, idp, tmp_path_factory):
    """A gateway with the audit log on, JWTs accepted, a backend that is down, and a capture rule."""
    directory = tmp_path_factory.mktemp("audit")
    gw = module_launcher.start(  # never ready: the "down" backend is down
        triton.grpc_url, routes=ROUTES, access=ACCESS, wait_ready=False,
        auth={"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(idp.jwks)}},
        backends={"triton": {"url": triton.grpc_url}, "down": {"url": f"127.0.0.1:{free_port()}"}},
        audit=audit_section(directory, capture={"rate": 1.0, "redact": ["ssn"]}))
    gw.audit_dir = directory
    return gw


def records(directory: Path, **filters: str) -> list[dict]:
    """The records `infergate audit query` prints for these filters."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in filters.items()]
    out = subprocess.run([sys.executable, "-m", "gateway", "audit", "query", str(directory), *args],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_records(directory: Path, count: int = 1, timeout: float = 10.0, **filters: str) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = records(directory, **filters)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def verify(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(directory)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def double_request(model: str = "double", request_id: str = "", values: np.ndarray | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append((values if values is not None else np.arange(4, dtype=np.float32)).tobytes())
    return request


def classifier_request(first: float, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="classifier", id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(np.array([[first] + [0.0] * 7], np.float32).tobytes())
    return request


def call(gw, request: pb.ModelInferRequest, metadata: tuple = (), timeout: float = 5.0):
    """(code, answer, trailers) of one gRPC ModelInfer."""
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            answer, rpc = stub.ModelInfer.with_call(request, timeout=timeout, metadata=metadata)
            return grpc.StatusCode.OK, answer, dict(rpc.trailing_metadata())
        except grpc.RpcError as e:
            return e.code(), None, dict(e.trailing_metadata() or ())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_served_request_is_recorded_with_its_trace_digests_and_decision(audited, idp):
    request = double_request(request_id="ok-grpc")
    request.parameters["ssn"].string_param = "078-05-1120"
    request.parameters["channel"].string_param = "web"
    code, answer, trailers = call(audited, request, (("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),
                                                     ("authorization", f"Bearer {idp.token('svc-a')}"),
                                                     ("x-subject-id", "customer-17")))
    assert code == grpc.StatusCode.OK
    span = trailers["traceparent"].split("-")
    assert span[1] == TRACE_ID and span[2] != PARENT and span[3] == "01"
    [record] = wait_records(audited.audit_dir, request_id="ok-grpc", type="infer")
    assert {k: record[k] for k in ("trace_id", "span_id", "parent_span_id", "principal", "via", "model", "target",
                                   "decision", "code", "protocol", "subject", "validation")} == {
        "trace_id": TRACE_ID, "span_id": span[2], "parent_span_id": PARENT, "principal": "svc-a", "via": "jwt",
        "model": "double", "target": "primary", "decision": "weight", "code": "OK", "protocol": "grpc",
        "subject": "customer-17", "validation": "not_checked"}
    assert record["inputs"] == {"INPUT0": sha(request.raw_input_contents[0])}
    assert record["outputs"] == {t.name: sha(answer.raw_output_contents[i]) for i, t in enumerate(answer.outputs)}
    assert len(record["config_version"]) == 12 and record["latency_ms"] > 0 and record["time"].endswith("Z")
    # payload capture (rate 1.0 in this gateway), with the ssn parameter redacted
    payload = record["payload"]
    assert payload["inputs"]["INPUT0"] == {"datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0]}
    assert payload["outputs"]["OUTPUT0"]["data"] == np.frombuffer(answer.raw_output_contents[0], np.float32).tolist()
    assert payload["parameters"] == {"ssn": "[redacted]", "channel": "web"}
    assert "078-05-1120" not in json.dumps(record)


def test_a_shadow_call_is_recorded_under_the_primarys_span(audited):
    code, _, trailers = call(audited, double_request(request_id="shadowed"), (("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),))
    assert code == grpc.StatusCode.OK
    primary_span = trailers["traceparent"].split("-")[2]
    [shadow] = wait_records(audited.audit_dir, request_id="shadowed", type="shadow")
    [primary] = records(audited.audit_dir, request_id="shadowed", type="infer")
    assert (shadow["trace_id"], shadow["parent_span_id"], shadow["target"], shadow["code"], shadow["agree"]) == (
        TRACE_ID, primary_span, "mirror", "OK", True)
    assert shadow["span_id"] != primary_span and shadow["inputs"] == primary["inputs"]
    assert shadow["outputs"] == primary["outputs"]  # same model, same answer


def test_http_requests_are_recorded_and_answer_their_span(audited):
    body = json.dumps({"id": "ok-http", "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode()
    req = urllib.request.Request(f"http://{audited.http_url}/v2/models/double/infer", data=body)
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["traceparent"].startswith("00-")
        trace_id = r.headers["traceparent"].split("-")[1]
    [record] = wait_records(audited.audit_dir, request_id="ok-http", type="infer")
    assert (record["trace_id"], record["parent_span_id"], record["protocol"], record["code"]) == (trace_id, None, "http", "OK")
    assert record["inputs"]["INPUT0"] == sha(np.array([1, 2, 3, 4], np.float32).tobytes())
    malformed = "1" * 32
    bad = urllib.request.Request(f"http://{audited.http_url}/v2/models/double/infer", data=b"{not json",
                                 headers={"traceparent": f"00-{malformed}-{PARENT}-00"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=5)
    assert refused.value.code == 400 and refused.value.headers["traceparent"].split("-")[1] == malformed
    [record] = wait_records(audited.audit_dir, trace=malformed)
    assert (record["span_id"], record["code"], record["model"]) == (
        refused.value.headers["traceparent"].split("-")[2], "INVALID_ARGUMENT", "double")


@pytest.mark.parametrize("case, expect", [
    ("validation", {"code": "INVALID_ARGUMENT", "validation": "rejected:max", "model": "classifier", "target": "primary"}),
    ("not_found", {"code": "NOT_FOUND", "model": "nowhere", "target": "<unknown>"}),
    ("unauthenticated", {"code": "UNAUTHENTICATED", "model": "secret", "principal": None}),
    ("bad_token", {"code": "UNAUTHENTICATED", "principal": None}),
    ("denied", {"code": "PERMISSION_DENIED", "model": "secret", "principal": "svc-b"}),
    ("limited", {"code": "RESOURCE_EXHAUSTED", "model": "limited"}),
    ("deadline", {"code": "DEADLINE_EXCEEDED", "model": "hurried", "target": "primary"}),
    ("backend", {"code": "INVALID_ARGUMENT", "model": "double", "validation": "not_checked"}),
    ("malformed", {"code": "INVALID_ARGUMENT"}),
    ("fallback", {"code": "OK", "model": "rules", "target": "fallback", "fallback": "default"}),
])
def test_every_error_class_and_the_fallback_leave_the_right_record(audited, idp, case, expect):
    trace_id = f"{abs(hash(case)) % 16**32:032x}"
    metadata = [("traceparent", f"00-{trace_id}-{PARENT}-01")]
    request = double_request(request_id=case)
    if case == "validation":
        request = classifier_request(500.0, case)
    elif case == "not_found":  # a caller that may ask for any model: the name is checked after access
        request.model_name = "nowhere"
        metadata.append(("authorization", f"Bearer {idp.token('svc-root')}"))
    elif case == "unauthenticated":
        request.model_name = "secret"
    elif case == "bad_token":
        metadata.append(("authorization", "Bearer not-a-token"))
    elif case == "denied":
        request.model_name = "secret"
        metadata.append(("authorization", f"Bearer {idp.token('svc-b')}"))
    elif case == "limited":
        request.model_name = "limited"
        call(audited, request, tuple(metadata))  # spends the bucket's one token
    elif case == "deadline":
        request = pb.ModelInferRequest(model_name="hurried", id=case)
        request.inputs.add(name="DELAY_MS", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(np.array([[500.0]], np.float32).tobytes())
    elif case == "backend":  # Triton's own refusal: the gateway does not validate this route
        request.inputs[0].name = "WRONG"
    elif case == "fallback":
        request = classifier_request(30.0, case)
        request.model_name = "rules"
    if case == "malformed":
        with grpc.insecure_channel(audited.grpc_url) as channel:
            rpc = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as e:
                rpc(b"\xff\xff\xff", timeout=5, metadata=tuple(metadata))
        code = e.value.code()
    else:
        code, _, trailers = call(audited, request, tuple(metadata))
        assert trailers["traceparent"].split("-")[1] == trace_id
    assert code.name == expect["code"]
    found = wait_records(audited.audit_dir, trace=trace_id, type="infer", count=2 if case == "limited" else 1)
    record = found[-1]
    assert len(found) == (2 if case == "limited" else 1)
    assert {k: record.get(k) for k in expect} == expect
    assert record["parent_span_id"] == PARENT
    if code.name != "OK":
        assert record["error"] and not record.get("outputs")
    else:
        assert record["outputs"]["probabilities"]


def test_the_log_verifies_and_counts_match_the_metrics(audited):
    written = metric(audited, "infergate_audit_records_written_total")
    assert written > 0 and metric(audited, "infergate_audit_dropped_total") == 0
    result = verify(audited.audit_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_traceparent_reaches_the_backend(start_gateway, tmp_path):
    """Triton only reads traceparent with OpenTelemetry tracing exported to a collector, which this
    machine does not run: a gRPC server of the test's own stands in as the backend to see the metadata."""
    seen: list[dict] = []

    def model_infer(raw: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        return pb.ModelInferResponse(model_name="double").SerializeToString()

    def server_ready(raw: bytes, context: grpc.ServicerContext) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
        "ServerReady": grpc.unary_unary_rpc_method_handler(server_ready)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        gw = start_gateway(f"127.0.0.1:{port}", routes={"double": {"target": {"backend": "triton", "model": "double"}}})
        code, _, trailers = call(gw, double_request(), (("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),
                                                        ("tracestate", "vendor=1")))
        assert code == grpc.StatusCode.OK
        assert seen[-1]["traceparent"] == trailers["traceparent"]  # Triton's parent is the gateway's span
        assert seen[-1]["tracestate"] == "vendor=1"
    finally:
        server.stop(0)


def test_sigkill_under_load_loses_no_record_older_than_the_fsync_interval(triton, start_gateway, tmp_path):
    directory = tmp_path / "audit"
    gw = start_gateway(triton.grpc_url, audit=audit_section(directory, fsync_interval_s=0.5))
    answered: list[tuple[float, str]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with grpc.insecure_channel(gw.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            n = 0
            while not stop.is_set():
                n += 1
                request_id = f"k{worker}-{n}"
                try:
                    stub.ModelInfer(double_request(request_id=request_id), timeout=2)
                except grpc.RpcError:
                    return
                answered.append((time.monotonic(), request_id))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    os.killpg(gw.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    stop.set()
    for t in threads:
        t.join(10)
    gw.proc.wait(10)
    assert len(answered) > 200
    # a restart recovers the stream: the log verifies and the chain goes on
    again = start_gateway(triton.grpc_url, audit=audit_section(directory, fsync_interval_s=0.5))
    assert call(again, double_request(request_id="after-restart"))[0] == grpc.StatusCode.OK
    assert wait_records(directory, request_id="after-restart")
    result = verify(directory)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = {r["request_id"] for r in records(directory, type="infer")}
    must = [rid for at, rid in answered if at < killed - 0.5]
    missing = [rid for rid in must if rid not in kept]
    assert not missing, f"{len(missing)} of {len(must)} answered requests have no record: {missing[:5]}"
    assert metric(again, "infergate_audit_recoveries_total") == 1  # the killed writer's segment was sealed


def test_fail_closed_refuses_while_the_disk_refuses_writes_and_loses_nothing(triton, start_gateway, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, set on the running gateway with prlimit) makes the segment
    file refuse writes with EFBIG, as a full disk would: the queue fills, requests are refused with
    UNAVAILABLE, and once the limit is lifted every answered request's record is written."""
    directory = tmp_path / "audit"
    gw = start_gateway(triton.grpc_url, audit=audit_section(directory, policy="fail_closed", queue_size=16))
    assert call(gw, double_request(request_id="before"))[0] == grpc.StatusCode.OK
    assert wait_records(directory, request_id="before")
    [segment] = sorted((directory / "w0").glob("segment-*.jsonl"))[-1:]
    limit = max(segment.stat().st_size, (gw.config_path.parent / "gateway.log").stat().st_size) + 20000
    _, hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))  # the soft limit: it can be raised again
    answered, refused = [], 0
    for n in range(400):
        code, _, _ = call(gw, double_request(request_id=f"fc-{n}"))
        if code == grpc.StatusCode.OK:
            answered.append(f"fc-{n}")
        else:
            assert code == grpc.StatusCode.UNAVAILABLE
            refused += 1
    assert refused > 0 and metric(gw, "infergate_audit_refused_total") == refused
    assert metric(gw, "infergate_audit_failures_total", stage="write") > 0
    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
    kept = wait_records(directory, count=len(answered) + 1, timeout=15, type="infer")
    assert {r["request_id"] for r in kept} >= set(answered)
    assert call(gw, double_request(request_id="after"))[0] == grpc.StatusCode.OK
    assert gw.stop() == 0
    result = verify(directory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_peak_throughput_drops_no_record(triton, start_gateway, tmp_path):
    """perf_analyzer at a concurrency that saturates this machine's cores, two workers, the default
    drop policy and queue: not one record dropped, one record per request served."""
    directory = tmp_path / "audit"
    gw = start_gateway(triton.grpc_url, workers=2, audit={"dir": str(directory)})
    gw.wait_workers(2)
    out = tmp_path / "perf.csv"
    run = subprocess.run([str(TRITON_SCRIPT), "perf_analyzer", "-m", "double", "-u", gw.grpc_url, "-i", "grpc",
                          "--shape", "INPUT0:4", "--concurrency-range", "16", "-s", "1000", "-p", "2000",
                          "--max-trials", "3", "-f", str(out)], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    served = metric(gw, "infergate_requests_total", model="double")
    assert served > 1000
    assert gw.stop() == 0  # drains: the last records are written and sealed
    assert sum(1 for _ in records(directory, type="infer")) == served
    text = (gw.config_path.parent / "gateway.log").read_text()
    assert "dropping records" not in text
    result = verify(directory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_purge_and_tamper_through_the_cli(triton, start_gateway, tmp_path):
    """After a clean stop: `audit purge` erases one subject and the log still verifies; one edited
    byte makes `audit verify` fail naming the file and line."""
    directory = tmp_path / "audit"
    key = tmp_path / "audit-signing.pem"
    subprocess.run([sys.executable, "-m", "gateway", "audit", "keygen", "--out", str(key)], cwd=ROOT, check=True)
    gw = start_gateway(triton.grpc_url, audit=audit_section(directory, signing_key=str(key)))
    for n in range(6):
        subject = "alice" if n % 2 else "bob"
        assert call(gw, double_request(request_id=f"p{n}"), (("x-subject-id", subject),))[0] == grpc.StatusCode.OK
    assert gw.stop() == 0
    assert len(records(directory, subject="alice")) == 3
    purge = subprocess.run([sys.executable, "-m", "gateway", "audit", "purge", str(directory), "--subject", "alice",
                            "--reason", "erasure request 42", "--key", str(key), "--operator", "dpo"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert records(directory, subject="alice") == [] and len(records(directory, subject="bob")) == 3
    check = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(directory), "--public-key", f"{key}.pub"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    purges = [json.loads(line) for line in (directory / "purges.jsonl").read_text().splitlines()]
    assert len(purges) == 1 and len(purges[0]["removed"]) == 3 and purges[0]["reason"] == "erasure request 42"
    assert "alice" not in (directory / "purges.jsonl").read_text()
    [segment] = sorted((directory / "w0").glob("segment-*.jsonl"))
    lines = segment.read_bytes().split(b"\n")
    edited = next(i for i, line in enumerate(lines) if b'"request_id":"p0"' in line)
    lines[edited] = lines[edited].replace(b'"code":"OK"', b'"code":"NO"')
    segment.write_bytes(b"\n".join(lines))
    tampered = verify(directory)
    assert tampered.returncode == 1 and f"{segment.name}:{edited + 1}:" in tampered.stdout + tampered.stderr
