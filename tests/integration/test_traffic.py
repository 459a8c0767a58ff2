"""Traffic steering against the real Triton and the two classifier versions: weighted canary,
sticky keys, header pins, blue-green, compared shadows, live reload and automatic rollback."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
import yaml

from tests.conftest import ADMIN_OPEN, ROOT, metric
from tests.routing_cases import BROKEN

V1 = {"backend": "triton", "model": "classifier", "version": 1}
V2 = {"backend": "triton", "model": "classifier", "version": 2}


def split(w1: int, w2: int, **extra) -> dict:
    return {"classifier": {"targets": {"v1": {**V1, "weight": w1}, "v2": {**V2, "weight": w2}}, **extra}}


def features(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def infer(client: grpcclient.InferenceServerClient, model: str = "classifier", headers: dict | None = None,
          data: np.ndarray | None = None) -> grpcclient.InferResult:
    tensor = grpcclient.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(features() if data is None else data)
    return client.infer(model, [tensor], headers=headers)


async def versions_served(url: str, n: int, concurrency: int = 32, headers: dict | None = None) -> list[str]:
    """Send n requests with `concurrency` in flight; the model_version of each answer."""
    client = grpc_aio.InferenceServerClient(url)
    tensor = grpc_aio.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(features())
    out: list[str] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            out.append((await client.infer("classifier", [tensor], headers=headers)).get_response().model_version)

    await asyncio.gather(*(worker(n // concurrency + (i < n % concurrency)) for i in range(concurrency)))
    await client.close()
    return out


def admin(gw, path: str, body: dict | None = None) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{gw.admin_port}{path}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
    return json.loads(urllib.request.urlopen(request, timeout=5).read())


def write_routes(gw, models: dict | str) -> None:
    path = gw.config_path.parent / "routing.yaml"
    text = models if isinstance(models, str) else yaml.safe_dump({"models": models, "access": ADMIN_OPEN})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_ten_thousand_requests_at_ten_percent_land_within_three_sigma(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(90, 10))
    served = await versions_served(gw.grpc_url, 10_000)
    n, p = len(served), 0.1
    assert n == 10_000
    assert abs(served.count("2") - n * p) < 3 * (n * p * (1 - p)) ** 0.5, served.count("2")


def test_sticky_keys_never_switch_and_pins_win(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(50, 50, sticky={"header": "x-user"},
                                                     match=[{"header": "x-canary", "value": "yes", "target": "v2"}]))
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    seen: dict[str, set[str]] = {}
    for i in range(150):
        for _ in range(3):
            seen.setdefault(f"user-{i}", set()).add(infer(client, headers={"x-user": f"user-{i}"}).get_response().model_version)
    assert all(len(v) == 1 for v in seen.values())
    assert 0.3 < sum(v == {"2"} for v in seen.values()) / len(seen) < 0.7
    pinned = {infer(client, headers={"x-user": f"user-{i}", "x-canary": "yes"}).get_response().model_version for i in range(60)}
    assert pinned == {"2"}
    h = httpclient.InferenceServerClient(gw.http_url)
    tensor = httpclient.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(features())
    assert h.infer("classifier", [tensor], headers={"X-Canary": "yes"}).get_response()["model_version"] == "2"


def test_blue_green_flip_is_atomic_and_instant_back(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(50, 50, active="v1"))
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    assert {infer(client).get_response().model_version for _ in range(30)} == {"1"}
    admin(gw, "/admin/routes/classifier/active", {"target": "v2"})
    assert {infer(client).get_response().model_version for _ in range(30)} == {"2"}
    admin(gw, "/admin/routes/classifier/active", {"target": "v1"})
    assert {infer(client).get_response().model_version for _ in range(30)} == {"1"}


def test_answers_name_the_target_that_served_them(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(0, 100))
    tensor = grpcclient.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(features())
    import grpc

    from gateway.protocol.wire import pb, pb_grpc
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(features().tobytes())
    with grpc.insecure_channel(gw.grpc_url) as channel:
        answer, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request)
    assert answer.model_version == "2" and ("infergate-target", "v2") in call.trailing_metadata()
    body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [0.0] * 8}]}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://{gw.http_url}/v2/models/classifier/infer", data=body)) as r:
        assert r.headers["infergate-target"] == "v2"


def test_shadow_counts_match_direct_comparison_and_leave_primary_alone(triton, start_gateway):
    shadowed = {**V1, "weight": 100}
    routes = {"plain": {"target": V1},
              "classifier": {"targets": {"v1": shadowed, "v2": {**V2, "weight": 0}},
                             "shadows": [{"target": "v2", "rate": 1.0, "compare": {"atol": None, "argmax": True}}]}}
    gw = start_gateway(triton.grpc_url, routes=routes)
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    n = 200
    inputs = [features(1, seed) * 3 for seed in range(n)]
    expected_disagree = 0
    for x in inputs:
        tensor = grpcclient.InferInput("features", [1, 8], "FP32")
        tensor.set_data_from_numpy(x)
        p1, p2 = (direct.infer("classifier", [tensor], model_version=v).as_numpy("probabilities") for v in "12")
        expected_disagree += int(p1.argmax() != p2.argmax())
    plain, shadow = [], []
    for x in inputs:  # interleaved, so both see the same machine
        for model, sink in (("plain", plain), ("classifier", shadow)):
            start = time.perf_counter()
            answer = infer(client, model, data=x)
            sink.append(time.perf_counter() - start)
            assert answer.get_response().model_version == "1"
    deadline = time.monotonic() + 10
    while metric(gw, "infergate_shadow_requests_total", model="classifier") < n and time.monotonic() < deadline:
        time.sleep(0.1)
    agree = metric(gw, "infergate_shadow_requests_total", model="classifier", result="agree")
    disagree = metric(gw, "infergate_shadow_requests_total", model="classifier", result="disagree")
    assert (agree, disagree) == (n - expected_disagree, expected_disagree)
    assert 0 < expected_disagree < n  # the two versions really differ on some of these inputs
    assert statistics.median(shadow) < 2 * statistics.median(plain) + 0.002


async def test_reload_under_load_loses_nothing_and_applies_within_a_second(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(100, 0))
    client = grpc_aio.InferenceServerClient(gw.grpc_url)
    tensor = grpc_aio.InferInput("features", [1, 8], "FP32")
    tensor.set_data_from_numpy(features())
    failures: list[Exception] = []
    served: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                answer = await client.infer("classifier", [tensor])
                served.append((time.monotonic(), answer.get_response().model_version))
            except Exception as e:  # noqa: BLE001 - every failure is counted
                failures.append(e)

    workers = [asyncio.create_task(load()) for _ in range(8)]
    delays = []
    for i in range(10):
        want = "2" if i % 2 == 0 else "1"
        written = time.monotonic()
        write_routes(gw, split(0, 100) if want == "2" else split(100, 0))
        while True:
            await asyncio.sleep(0.02)
            recent = [v for t, v in served if t > time.monotonic() - 0.05]
            if recent and set(recent) == {want}:
                break
            assert time.monotonic() - written < 3, "new weights not applied"
        first = next(t for t, v in served if t > written and v == want)
        delays.append(first - written)
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    await client.close()
    assert failures == []
    assert max(delays) < 1.0, delays
    duration = served[-1][0] - served[0][0]
    assert len(served) / duration > 50, "the load was not steady"  # several hundred/s on a quiet machine
    assert metric(gw, "infergate_config_reloads_total", result="ok") >= 10


def test_broken_routing_files_are_rejected_while_traffic_continues(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(0, 100))
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    log = gw.config_path.parent / "gateway.log"
    for case, (text, line, reason) in BROKEN.items():
        rejected = metric(gw, "infergate_config_reloads_total", result="rejected")
        write_routes(gw, text)
        deadline = time.monotonic() + 3
        while metric(gw, "infergate_config_reloads_total", result="rejected") == rejected:
            assert time.monotonic() < deadline, f"{case}: not rejected"
            time.sleep(0.05)
        assert {infer(client).get_response().model_version for _ in range(5)} == {"2"}, case
        assert re.search(rf"routing\.yaml:{line}: .*{re.escape(reason)}", log.read_text()), case


def test_sighup_and_every_worker_reload(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(100, 0), workers=2)
    gw.wait_workers(2)
    log = gw.config_path.parent / "gateway.log"
    write_routes(gw, split(0, 100))
    time.sleep(1.0)
    for _ in range(10):  # new connections: the kernel spreads them over both workers
        assert infer(grpcclient.InferenceServerClient(gw.grpc_url)).get_response().model_version == "2"
    assert log.read_text().count("routing reloaded (file changed)") == 2
    write_routes(gw, split(100, 0))
    gw.proc.send_signal(signal.SIGHUP)  # the supervisor passes it to every worker
    deadline = time.monotonic() + 5
    while log.read_text().count("routing reloaded (SIGHUP)") < 2:
        assert time.monotonic() < deadline, "SIGHUP did not reach both workers"
        time.sleep(0.1)
    for _ in range(10):
        assert infer(grpcclient.InferenceServerClient(gw.grpc_url)).get_response().model_version == "1"


def test_configmap_symlink_swap_is_picked_up(triton, start_gateway, tmp_path):
    """Kubernetes mounts a ConfigMap as routing.yaml -> ..data/routing.yaml, ..data -> ..<timestamp>;
    an update swaps ..data. The gateway must follow the link, not the first target it saw."""
    gw = start_gateway(triton.grpc_url, routes=split(100, 0))
    directory = gw.config_path.parent
    for i, routes in enumerate((split(100, 0), split(0, 100), split(100, 0))):
        version = directory / f"..v{i}"
        version.mkdir()
        (version / "routing.yaml").write_text(yaml.safe_dump({"models": routes, "access": ADMIN_OPEN}))
        link = directory / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, directory / "..data")
        if i == 0:
            (directory / "routing.yaml").unlink()
            (directory / "routing.yaml").symlink_to("..data/routing.yaml")
        else:
            shutil.rmtree(directory / f"..v{i - 1}")
        time.sleep(1.0)
        want = "1" if i != 1 else "2"
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert {infer(client).get_response().model_version for _ in range(10)} == {want}, i


def test_failing_canary_is_rolled_back_automatically(triton, start_gateway):
    broken = {"backend": "triton", "model": "classifier", "version": 3}  # no such version: every call fails
    routes = {"classifier": {"targets": {"stable": {**V1, "weight": 100}, "canary": {**broken, "weight": 0}},
                             "rollout": {"target": "canary", "steps": [30, 100], "dwell_s": 30, "min_requests": 10}}}
    gw = start_gateway(triton.grpc_url, routes=routes)
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    errors = 0
    deadline = time.monotonic() + 15
    while admin(gw, "/admin/routes")[0]["rollout"]["phase"] == "progressing":
        assert time.monotonic() < deadline, "canary was not rolled back"
        try:
            infer(client)
        except Exception:  # noqa: BLE001 - the canary's failures are the point
            errors += 1
    rollout = admin(gw, "/admin/routes")[0]["rollout"]
    assert rollout["phase"] == "rolled_back" and "error rate" in rollout["reason"] and rollout["percent"] == 0
    assert errors >= 10
    assert {infer(client).get_response().model_version for _ in range(30)} == {"1"}
    assert "rolled back to 0%" in (gw.config_path.parent / "gateway.log").read_text()


def test_admin_weights_override_and_routes_command(triton, start_gateway):
    gw = start_gateway(triton.grpc_url, routes=split(100, 0))
    admin(gw, "/admin/routes/classifier/weights", {"weights": {"v1": 0, "v2": 100}})
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    assert {infer(client).get_response().model_version for _ in range(20)} == {"2"}
    shown = subprocess.run([sys.executable, "-m", "gateway", "routes", "--admin", f"http://127.0.0.1:{gw.admin_port}"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"classifier\s+v1\s+triton/classifier:1\s+100\s+0\s+0%", shown), shown
    assert "runtime overrides" in shown
    state = json.loads((gw.config_path.parent / "routing.yaml.state.json").read_text())
    assert state["classifier"]["weights_override"] == {"v1": 0, "v2": 100}
    write_routes(gw, split(90, 10))  # the file changed for this route: its overrides end
    time.sleep(1.0)
    assert admin(gw, "/admin/routes")[0]["overrides"] == {}
