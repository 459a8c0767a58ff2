"""Two gateway replicas sharing one Redis (scripts/redis.sh): a global rate limit holds across
both (each in front of its own Triton) within the documented bound, Redis stopped applies each
limit's declared policy and Redis started again is used again; drift statistics merged over the
two replicas equal one process's over the same traffic."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.drift.profile import Profile, build_profile
from gateway.drift.state import Binner
from gateway.drift.stats import compare
from gateway.protocol.wire import pb, pb_grpc
from tests.conftest import metric

DOUBLE = {"target": {"backend": "triton", "model": "double"}}
RATE, BURST, LEASE, REPLICAS = 40, 10, 4, 2
GLOBAL = {"rate": RATE, "burst": BURST, "scope": "global", "lease": LEASE}
SLACK = REPLICAS * LEASE   # the error bound: processes x lease


def double_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return request


async def drive(targets: list[tuple[str, str]], seconds: float, per_second: float) -> tuple[list[Counter], float]:
    """Open loop: to every (gateway, model) at once, one request each 1/per_second s for `seconds`;
    the codes each got, and the time from the first request sent to the last."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent: list[float] = []

    async def one(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, codes: Counter) -> None:
        try:
            await stub.ModelInfer(request, timeout=5)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            codes[e.code().name] += 1

    async def stream(url: str, model: str) -> Counter:
        codes: Counter = Counter()
        request = double_request(model)
        async with grpc.aio.insecure_channel(url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await channel.channel_ready()
            calls = []
            for i in range(int(seconds * per_second)):
                await asyncio.sleep(max(0.0, start + i / per_second - loop.time()))
                calls.append(asyncio.create_task(one(stub, request, codes)))
                sent.append(loop.time())
            await asyncio.gather(*calls)
        return codes

    found = await asyncio.gather(*(stream(url, model) for url, model in targets))
    return found, max(sent) - min(sent)


def logged(gw, text: str, timeout: float = 5.0) -> None:
    log = gw.config_path.parent / "gateway.log"
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in the log of {gw.config_path.parent.name} within {timeout}s"
        time.sleep(0.1)


async def test_a_global_limit_holds_across_replicas_and_redis_down_applies_the_policy(
        triton, spawn_triton, start_gateway, redis_server):
    routes = {"double": {**DOUBLE, "rate_limit": GLOBAL},                                  # on_redis_down: fail_open
              "strict": {**DOUBLE, "rate_limit": {**GLOBAL, "on_redis_down": "fail_closed"}}}
    redis = {"url": redis_server.url, "timeout_s": 0.2, "retry_s": 0.5}
    gws = [start_gateway(t.grpc_url, routes=routes, redis=redis) for t in (triton, spawn_triton())]

    # Redis up: both replicas together, as one bucket (each one's local bucket alone would pass b + rT)
    codes, window = await drive([(gw.grpc_url, "double") for gw in gws], seconds=3.0, per_second=100)
    admitted, exact = sum(c["OK"] for c in codes), BURST + RATE * window
    print(f"\nRedis up: {[dict(c) for c in codes]}; one exact bucket admits {exact:.0f}, the bound is +-{SLACK}")
    assert exact - SLACK - LEASE <= admitted <= exact + SLACK
    assert all(c["OK"] >= 0.25 * admitted and set(c) == {"OK", "RESOURCE_EXHAUSTED"} for c in codes)

    # Redis down: fail_open leaves each replica its local limit; fail_closed refuses what no lease covers
    redis_server.stop()
    codes, window = await drive([(gw.grpc_url, model) for gw in gws for model in ("double", "strict")], 2.0, 60)
    print(f"Redis down: fail_open {[dict(c) for c in codes[::2]]}, fail_closed {[dict(c) for c in codes[1::2]]}")
    for fail_open, fail_closed, gw in zip(codes[::2], codes[1::2], gws):
        local = BURST + RATE * window  # the local bucket alone, on each replica
        assert local - SLACK <= fail_open["OK"] <= local + 1 and fail_open["RESOURCE_EXHAUSTED"] > 0
        assert fail_closed["OK"] == 0 and fail_closed["UNAVAILABLE"] > 0 and set(fail_closed) <= {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
        assert metric(gw, "infergate_redis_errors_total", use="limits") >= 1
        assert metric(gw, "infergate_global_limit_degraded_total", scope="model", decision="admitted") >= fail_open["OK"] - LEASE
        assert metric(gw, "infergate_global_limit_degraded_total", scope="model", decision="refused") == fail_closed["UNAVAILABLE"]
        assert metric(gw, "infergate_requests_total", model="strict", code="UNAVAILABLE") == fail_closed["UNAVAILABLE"]

    # Redis back (empty): both replicas reconnect and the limit is global again
    redis_server.start()
    degraded = [metric(gw, "infergate_global_limit_degraded_total") for gw in gws]
    for gw in gws:
        logged(gw, "reachable again")
    time.sleep(0.3)  # the local buckets refill their burst
    codes, window = await drive([(gw.grpc_url, "double") for gw in gws] + [(gws[1].grpc_url, "strict")], 2.0, 100)
    admitted, exact = codes[0]["OK"] + codes[1]["OK"], BURST + RATE * window
    print(f"Redis back: {[dict(c) for c in codes]}; one exact bucket admits {exact:.0f}")
    assert exact - SLACK - LEASE <= admitted <= exact + SLACK
    assert codes[2]["OK"] > 0 and "UNAVAILABLE" not in codes[2]
    assert [metric(gw, "infergate_global_limit_degraded_total") for gw in gws] == degraded


FEATURES = 8


def classify(url: str, rows: np.ndarray) -> np.ndarray:
    """Class probabilities of classifier version 1 for rows, one request per row (as the gateway
    answers them, so the test bins what the gateways binned)."""
    client = grpcclient.InferenceServerClient(url)
    out = []
    for row in rows:
        tensor = grpcclient.InferInput("features", [1, FEATURES], "FP32")
        tensor.set_data_from_numpy(row[None])
        out.append(client.infer("classifier", [tensor], model_version="1").as_numpy("probabilities"))
    client.close()
    return np.concatenate(out)


async def test_drift_merged_over_two_replicas_equals_one_process_over_all_traffic(
        triton, start_gateway, redis_server, tmp_path):
    rng = np.random.default_rng(13)
    reference = rng.normal(size=(1000, FEATURES)).astype(np.float32)
    profile_path = tmp_path / "classifier-1.json"
    build_profile("classifier", "1", {"features": reference}, {"probabilities": classify(triton.grpc_url, reference[:300])},
                  {}).save(profile_path)
    drift = {"profiles": [str(profile_path)], "window": {"kind": "count", "size": 100_000}, "interval_s": 0.2, "min_count": 1}
    routes = {"classifier": {"target": {"backend": "triton", "model": "classifier", "version": 1}, "drift": drift}}
    gws = [start_gateway(triton.grpc_url, routes=routes, redis={"url": redis_server.url}) for _ in range(REPLICAS)]

    traffic = [rng.normal(size=(150, FEATURES)).astype(np.float32), rng.normal(0.4, 1.2, size=(250, FEATURES)).astype(np.float32)]
    answers = await asyncio.gather(*(asyncio.to_thread(classify, gw.grpc_url, rows) for gw, rows in zip(gws, traffic)))

    profile = Profile.load(profile_path)
    binner = Binner(profile)
    single = binner.zeros()            # one process that saw all 400 requests
    for rows, probs in zip(traffic, answers):
        for row, p in zip(rows, probs):
            binner.observe(single, {"features": row[None]}, {"probabilities": p[None]})
            single.n += 1
    expected = compare(profile, single)
    outputs = expected.outputs["probabilities"]
    judged = {**expected.features, "output:probabilities:argmax": {"js": outputs["argmax_js"]},
              "output:probabilities:probabilities": {"js": outputs["prob_js"]}}

    deadline = time.monotonic() + 10
    while not all(metric(gw, "infergate_drift_window_requests", model="classifier") == 400 for gw in gws):
        assert time.monotonic() < deadline, [metric(gw, "infergate_drift_window_requests", model="classifier") for gw in gws]
        time.sleep(0.2)
    for gw in gws:   # every replica judges the sum, though each binned only its own share
        for feature, statistics in judged.items():
            for name, value in statistics.items():
                assert metric(gw, "infergate_drift_statistic", model="classifier", version="1", feature=feature,
                              statistic=name) == pytest.approx(value, rel=1e-12, abs=1e-15), (feature, name)
    print(f"\nmerged drift over {REPLICAS} replicas: psi of features[0] {expected.features['features[0]']['psi']:.4f}, "
          f"argmax js {expected.outputs['probabilities']['argmax_js']:.4f}; {len(judged)} features, all equal")
