"""Circuit breakers against a real Triton that is killed (SIGKILL) under load and brought back."""
from __future__ import annotations

import json
import os
import signal
import statistics
import time
import urllib.request

import grpc
import numpy as np
import pytest

from gateway.protocol.wire import pb, pb_grpc
from tests.conftest import metric

FALLBACK = {"features": {"f0": {"input": "features", "index": 0}}, "outputs": {"probabilities": "FP32"},
            "default": {"name": "prior", "outputs": {"probabilities": [0.34, 0.33, 0.33]}}}
BREAKER = {"failures": 3, "open_s": 1.5, "half_open_probes": 1}


def ask(stub, model: str) -> tuple[str, float]:
    """'real', 'fallback' or the error code name, and the client-side latency in seconds."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(np.zeros(8, np.float32).tobytes())
    start = time.perf_counter()
    try:
        answer = stub.ModelInfer(request, timeout=5)
    except grpc.RpcError as e:
        return e.code().name, time.perf_counter() - start
    return ("fallback" if "infergate_fallback" in answer.parameters else "real"), time.perf_counter() - start


def breaker_state(gw, model: str) -> str:
    routes = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/admin/routes").read())
    return next(r for r in routes if r["model"] == model)["targets"][0]["breaker"]


def test_kill_opens_the_breaker_then_fallback_answers_fast_then_recovery_closes_it(spawn_triton, start_gateway):
    triton = spawn_triton()
    v1 = {"backend": "triton", "model": "classifier", "version": 1}
    gw = start_gateway(triton.grpc_url, routes={
        "guarded": {"target": v1, "breaker": BREAKER, "fallback": FALLBACK, "timeout_s": 2},
        "bare": {"target": v1, "breaker": BREAKER, "timeout_s": 2}})
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc_url))
    assert {ask(stub, "guarded")[0] for _ in range(20)} == {"real"}

    os.kill(triton.pid, signal.SIGKILL)
    bare = [ask(stub, "bare")[0] for _ in range(6)]
    assert bare[:3] == ["UNAVAILABLE"] * 3 and set(bare) == {"UNAVAILABLE"}  # refused by Triton's absence, then by the breaker
    assert breaker_state(gw, "bare") == "open"
    fast_before = metric(gw, "infergate_request_duration_seconds_bucket", model="guarded", le="0.001")
    answers = [ask(stub, "guarded") for _ in range(40)]
    assert {kind for kind, _ in answers} == {"fallback"}  # no caller sees an error
    assert breaker_state(gw, "guarded") == "open"
    assert statistics.median(s for _, s in answers[10:]) < 0.005  # answered without touching the backend
    # gateway time, from its own latency histogram: nearly all of them within 1 ms
    assert metric(gw, "infergate_request_duration_seconds_bucket", model="guarded", le="0.001") - fast_before >= 35

    triton.start()
    deadline = time.monotonic() + 20
    while ask(stub, "guarded")[0] != "real":
        assert time.monotonic() < deadline, "the breaker never closed again"
        time.sleep(0.2)
    assert breaker_state(gw, "guarded") == "closed"
    assert {ask(stub, "guarded")[0] for _ in range(10)} == {"real"}


def test_a_hung_triton_never_holds_a_request_past_its_deadline(spawn_triton, start_gateway):
    """SIGSTOP: the connection stays open but nothing answers."""
    triton = spawn_triton()
    v1 = {"backend": "triton", "model": "classifier", "version": 1}
    gw = start_gateway(triton.grpc_url, routes={"hung": {"target": v1, "timeout_s": 0.5},
                                                 "guarded": {"target": v1, "timeout_s": 0.5, "fallback": FALLBACK}})
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc_url))
    assert ask(stub, "hung")[0] == "real"
    pid = triton.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for model, expected in (("hung", "DEADLINE_EXCEEDED"), ("guarded", "fallback")):
            for _ in range(3):
                kind, seconds = ask(stub, model)
                assert kind == expected and seconds < 1.0, (model, kind, seconds)
        request = pb.ModelInferRequest(model_name="hung")  # a client deadline shorter than the route's
        request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
        request.raw_input_contents.append(np.zeros(8, np.float32).tobytes())
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=0.2)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.perf_counter() - start < 0.5
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while ask(stub, "hung")[0] != "real":
        assert time.monotonic() < deadline
