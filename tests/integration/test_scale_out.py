"""Several gateway replicas sharing route state through a real Redis (issue #11): two gateway
processes, each in front of its own Triton, one Redis. Admin changes and rollout decisions made
on one replica hold on the other within a second; exactly one replica (the lease holder) decides
rollouts and a SIGKILLed leader's lease passes on; Redis down keeps the last state and refuses
changes; round-robin gRPC clients lose only the killed replica's in-flight requests."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio

from tests.conftest import ROOT, metric

LEASE_S = 1.0
V1 = {"backend": "triton", "model": "classifier", "version": 1}
V2 = {"backend": "triton", "model": "classifier", "version": 2}
V3 = {"backend": "triton", "model": "classifier", "version": 3}   # only the second Triton has it
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@pytest.fixture(scope="module")
def tritons(triton, module_spawn_triton, tmp_path_factory):
    """The session's Triton (classifier 1 and 2) and one of this module's with a classifier 3 too."""
    repo = tmp_path_factory.mktemp("models")
    shutil.copytree(ROOT / "models", repo, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "classifier" / "2", repo / "classifier" / "3")
    return triton, module_spawn_triton(models=repo)


@pytest.fixture
def replicas(tritons, redis_server, start_gateway):
    """start(routes) -> (a, b): replica a in front of the first Triton starts first (and leads),
    b in front of the second; both share redis_server."""
    def start(routes: dict, lease_s: float = LEASE_S) -> tuple:
        shared = {"redis": {"url": redis_server.url, "key_prefix": "test:", "timeout_s": 0.3},
                  "route_state": {"store": "redis", "lease_s": lease_s, "check_interval_s": 0.5}}
        a = start_gateway(tritons[0].grpc_url, routes=routes, **shared)
        wait_for(lambda: metric(a, "infergate_rollout_leader") == 1, 5, "replica a never took the lease")
        b = start_gateway(tritons[1].grpc_url, routes=routes, **shared)
        return a, b
    return start


def wait_for(condition, timeout: float, message: str, every: float = 0.02) -> float:
    """Poll condition until true; the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, message
        time.sleep(every)
    return time.monotonic() - start


def admin(gw, path: str, body: dict | None = None) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{gw.admin_port}{path}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
    return json.loads(urllib.request.urlopen(request, timeout=5).read())


def route(gw) -> dict:
    return admin(gw, "/admin/routes")[0]


def versions(gw, n: int = 20) -> set[str]:
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    tensor = grpcclient.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 8), np.float32))
    return {client.infer("classifier", [tensor]).get_response().model_version for _ in range(n)}


def send(gw, n: int) -> int:
    """n classifier requests; how many failed."""
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    tensor = grpcclient.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 8), np.float32))
    failed = 0
    for _ in range(n):
        try:
            client.infer("classifier", [tensor])
        except Exception:  # noqa: BLE001 - a failing canary is the point where it is used
            failed += 1
    return failed


def kill(gw) -> None:
    os.killpg(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)


def lease_holder_pid(redis_server) -> int | None:
    token = redis.Redis.from_url(redis_server.url, decode_responses=True).get("test:rollout-leader")
    return int(token.split(":")[1]) if token else None


def test_an_admin_change_on_one_replica_holds_on_the_other_within_a_second(replicas):
    a, b = replicas({"classifier": {"targets": {"v1": {**V1, "weight": 100}, "v2": {**V2, "weight": 0}}}}, lease_s=3.0)
    assert versions(b) == {"1"}
    admin(a, "/admin/routes/classifier/weights", {"weights": {"v1": 0, "v2": 100}})
    took = wait_for(lambda: route(b)["overrides"].get("weights") == {"v1": 0, "v2": 100}, 1.0,
                    "replica b did not apply replica a's weights within a second")
    assert versions(b) == {"2"}, f"b applied the weights after {took:.2f}s but serves otherwise"
    admin(b, "/admin/routes/classifier/reset", {})   # and back, the other way round
    wait_for(lambda: route(a)["overrides"] == {}, 1.0, "replica a did not apply replica b's reset within a second")
    assert versions(a) == {"1"}
    assert not list(a.config_path.parent.glob("*.state.json")), "with Redis no state file is written"
    a.proc.send_signal(signal.SIGTERM)   # a draining leader releases its lease: b takes it at its next try, not after the TTL
    took = wait_for(lambda: metric(b, "infergate_rollout_leader") == 1, 5, "b did not take the lease")
    assert took < 1.5, f"b took the lease {took:.2f}s after a's SIGTERM (lease 3 s, tries every 1 s): a did not hand it over"
    assert a.proc.wait(10) == 0 and "lease test:rollout-leader released" in (a.config_path.parent / "gateway.log").read_text()


def test_a_canary_rolled_back_by_the_leader_is_rolled_back_on_both_within_a_second(replicas):
    # The canary (version 3) fails on a's Triton only: a's gates roll it back, b learns of it.
    a, b = replicas({"classifier": {"targets": {"stable": {**V1, "weight": 100}, "canary": {**V3, "weight": 0}},
                                    "rollout": {"target": "canary", "steps": [50, 100], "dwell_s": 30, "min_requests": 5}}})
    wait_for(lambda: metric(a, "infergate_rollout_events_total", event="started") == 1, 3, "the leader did not start the rollout")
    deadline = time.monotonic() + 15
    while route(a)["rollout"]["phase"] == "progressing":
        assert time.monotonic() < deadline, "the leader did not roll the failing canary back"
        send(a, 10)
    decided = route(a)["rollout"]["since"]   # the leader's wall clock when it rolled back
    wait_for(lambda: route(b)["rollout"]["phase"] == "rolled_back", 1.0, "b did not follow within a second")
    seen = time.time()
    rollout = route(b)["rollout"]
    assert seen - decided < 1.0 and rollout["percent"] == 0 and "error rate" in rollout["reason"]
    assert versions(b) == {"1"}
    assert metric(a, "infergate_rollout_events_total", event="rolled_back") == 1
    assert metric(b, "infergate_rollout_events_total") == 0, "only the leader decides"


def test_killing_the_leader_hands_the_lease_to_the_other(replicas, redis_server):
    a, b = replicas({"classifier": {"targets": {"stable": {**V1, "weight": 100}, "canary": {**V2, "weight": 0}},
                                    "rollout": {"target": "canary", "steps": [50, 100], "dwell_s": 0.5, "min_requests": 5}}})
    wait_for(lambda: metric(a, "infergate_rollout_events_total", event="started") == 1, 3, "the leader did not start the rollout")
    assert lease_holder_pid(redis_server) == a.proc.pid and metric(b, "infergate_rollout_leader") == 0
    kill(a)   # no traffic reached a: its controller never judged the canary
    took = wait_for(lambda: metric(b, "infergate_rollout_leader") == 1, LEASE_S * 2 + 1,
                    "replica b did not take the lease after the leader died")
    assert lease_holder_pid(redis_server) == b.proc.pid
    assert took <= LEASE_S * 4 / 3 + 0.5, f"handover took {took:.2f}s, lease {LEASE_S}s renewed every third"
    deadline = time.monotonic() + 15
    while route(b)["rollout"]["phase"] != "promoted":   # b's controller now ticks: it advances the canary
        assert time.monotonic() < deadline, f"the new leader did not advance the rollout: {route(b)['rollout']}"
        assert send(b, 10) == 0
    assert metric(b, "infergate_rollout_events_total", event="advanced") == 1
    assert metric(b, "infergate_rollout_events_total", event="promoted") == 1
    assert versions(b) == {"2"}


def test_redis_down_keeps_the_last_state_refuses_changes_and_recovers(replicas, redis_server):
    a, b = replicas({"classifier": {"targets": {"v1": {**V1, "weight": 100}, "v2": {**V2, "weight": 0}}}})
    admin(a, "/admin/routes/classifier/weights", {"weights": {"v1": 0, "v2": 100}})
    wait_for(lambda: route(b)["overrides"].get("weights") is not None, 1.0, "b did not follow")
    redis_server.stop()
    wait_for(lambda: metric(a, "infergate_route_state_store_up") == 0, 3, "a did not notice Redis is down")
    with pytest.raises(urllib.error.HTTPError) as refused:
        admin(a, "/admin/routes/classifier/reset", {})
    assert refused.value.code == 503
    message = json.loads(refused.value.read())["error"]
    assert "refused" in message and "unreachable" in message, message
    assert metric(a, "infergate_route_state_errors_total", op="update") == 1
    assert versions(a) == {"2"} and versions(b) == {"2"}, "the last known state stays in force"
    assert "the last known route states stay in force" in (a.config_path.parent / "gateway.log").read_text()
    redis_server.start()   # empty: it kept nothing
    wait_for(lambda: metric(a, "infergate_route_state_store_up") == 1 and metric(b, "infergate_route_state_store_up") == 1,
             3, "the replicas did not see Redis return")
    stored = redis.Redis.from_url(redis_server.url, decode_responses=True).hgetall("test:route-state")
    assert json.loads(stored["classifier"])["weights_override"] == {"v1": 0, "v2": 100}, "the last state was put back"
    admin(a, "/admin/routes/classifier/reset", {})
    wait_for(lambda: route(b)["overrides"] == {}, 1.0, "changes did not flow again after Redis returned")
    wait_for(lambda: metric(b, "infergate_rollout_leader") + metric(a, "infergate_rollout_leader") == 1, LEASE_S * 3,
             "no replica (or both) took the lease again")


async def _load(target: str, stop: asyncio.Event, outcomes: list[tuple[float, bool]], concurrency: int = 8) -> None:
    """Keep `concurrency` slow (50 ms) requests in flight over a round_robin channel until stop."""
    client = grpc_aio.InferenceServerClient(target, channel_args=[("grpc.service_config", ROUND_ROBIN)])
    tensor = grpc_aio.InferInput("DELAY_MS", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[50.0]], np.float32))

    async def worker() -> None:
        while not stop.is_set():
            try:
                await client.infer("slow", [tensor], client_timeout=5)
                outcomes.append((time.monotonic(), True))
            except Exception:  # noqa: BLE001 - failures are what is counted
                outcomes.append((time.monotonic(), False))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()


async def test_round_robin_clients_lose_only_the_killed_replicas_in_flight_requests(replicas):
    a, b = replicas({"slow": {"target": {"backend": "triton", "model": "slow"}}})
    outcomes: list[tuple[float, bool]] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(f"ipv4:127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}", stop, outcomes))
    await asyncio.sleep(2.0)
    served = [metric(gw, "infergate_requests_total", model="slow") for gw in (a, b)]
    assert min(served) >= 0.3 * sum(served) > 0, f"round_robin did not spread the load: {served}"
    killed_at = time.monotonic()
    kill(b)
    await asyncio.sleep(2.0)
    stop.set()
    await load
    failures = [t for t, ok in outcomes if not ok]
    after = [ok for t, ok in outcomes if t > killed_at + 0.5]
    assert all(t >= killed_at for t in failures), "nothing failed before the kill"
    assert 1 <= len(failures) <= 8, f"{len(failures)} failures: only requests in flight on the killed replica may fail"
    assert all(t < killed_at + 0.5 for t in failures), "requests kept failing after the replica was gone"
    assert len(after) >= 20 and all(after), "the surviving replica did not carry the load"
    assert metric(a, "infergate_requests_total", model="slow") - served[0] >= len(after)
