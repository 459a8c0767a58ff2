"""Inline drift end to end: reference profiles built with `infergate drift profile` from a sample
and the real classifier's answers, a gateway binning live traffic, alerts when two of eight
features shift by half a standard deviation (and none without the shift), and a canary whose
predictions depart from the primary's rolled back by the distribution gate; a drift that persists
raises one signed retrain event per window."""
from __future__ import annotations

import base64
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from gateway.audit.chain import create_key, load_public_keys
from gateway.drift.state import Counts
from gateway.outcomes.retrain import SignatureError, verify
from tests.conftest import ROOT, metric

FEATURES = 8
CHUNK = 100


def classify(url: str, x: np.ndarray, model: str = "classifier", version: str = "") -> np.ndarray:
    """Class probabilities for rows of x, in batches the model accepts."""
    client = grpcclient.InferenceServerClient(url)
    out = []
    for start in range(0, len(x), 32):
        tensor = grpcclient.InferInput("features", [len(x[start:start + 32]), FEATURES], "FP32")
        tensor.set_data_from_numpy(x[start:start + 32])
        out.append(client.infer(model, [tensor], model_version=version).as_numpy("probabilities"))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def profiles(triton, tmp_path_factory) -> Path:
    """Profiles of classifier versions 1 and 2 from a N(0, 1) sample and Triton's own answers."""
    d = tmp_path_factory.mktemp("profiles")
    sample = np.random.default_rng(7).normal(size=(4000, FEATURES)).astype(np.float32)
    np.save(d / "reference.npy", sample)
    for version in ("1", "2"):  # version 2's training time comes from Triton's model config instead
        np.save(d / f"probs-{version}.npy", classify(triton.grpc_url, sample, version=version))
        trained = ["--trained-at", "2026-01-01T00:00:00Z"] if version == "1" else []
        subprocess.run([sys.executable, "-m", "gateway", "drift", "profile", "--model", "classifier", "--version", version,
                        "--input", f"features={d / 'reference.npy'}", "--output", f"probabilities={d / f'probs-{version}.npy'}",
                        *trained, "--out", str(d / f"classifier-{version}.json")], cwd=ROOT, check=True, timeout=120)
    return d


def send(gw, rows: np.ndarray) -> None:
    """One request per row, on a connection of its own (no subchannel shared with other clients)."""
    client = grpcclient.InferenceServerClient(gw.grpc_url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    for row in rows:
        tensor = grpcclient.InferInput("features", [1, FEATURES], "FP32")
        tensor.set_data_from_numpy(row[None])
        client.infer("classifier", [tensor])


def alerts(gw) -> float:
    return metric(gw, "infergate_drift_alerts_total", model="classifier")


def test_shift_on_two_features_raises_an_alert_and_no_shift_raises_none(triton, start_gateway, profiles):
    drift = {"profiles": [str(profiles / "classifier-1.json")], "window": {"kind": "count", "size": 200},
             "interval_s": 0.2, "min_count": 200, "thresholds": {"psi": 0.2, "output_js": None, "chi2_p": None},
             "stale_after_s": 3600}
    gw = start_gateway(triton.grpc_url, routes={"classifier": {"target": {"backend": "triton", "model": "classifier",
                                                                          "version": 1}, "drift": drift}})
    rng = np.random.default_rng(11)
    send(gw, rng.normal(size=(1000, FEATURES)).astype(np.float32))
    time.sleep(0.6)
    assert metric(gw, "infergate_drift_window_requests", model="classifier", version="1") >= 200
    assert alerts(gw) == 0, "false alarm on unshifted traffic"
    assert metric(gw, "infergate_model_stale", model="classifier", version="1") == 1  # trained 2026-01-01

    shifted = rng.normal(size=(2000, FEATURES)).astype(np.float32)
    shifted[:, :2] += 0.5
    sent = 0
    while alerts(gw) == 0 and sent < len(shifted):
        send(gw, shifted[sent:sent + CHUNK])
        sent += CHUNK
        time.sleep(0.4)
    print(f"\ndrift detected after {sent} shifted requests (window 200, checks every 0.2 s)")
    assert alerts(gw) >= 1 and sent <= 1000
    fired = {f for f in ("features[0]", "features[1]", "features[2]", "features[5]")
             if metric(gw, "infergate_drift_alert", model="classifier", feature=f) == 1}
    assert {"features[0]", "features[1]"} <= fired and not fired & {"features[2]", "features[5]"}
    assert metric(gw, "infergate_drift_statistic", model="classifier", feature="features[0]", statistic="psi") > 0.2
    log = (gw.config_path.parent / "gateway.log").read_text()
    assert "drift alert: model classifier version 1 feature features[0]" in log


class Hook(http.server.BaseHTTPRequestHandler):
    """A retrain webhook receiver: keeps each POST's raw body and headers, answers 204."""

    received: list[tuple[float, bytes, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append((time.monotonic(), body, dict(self.headers)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_persistent_drift_raises_one_signed_retrain_event_per_window(triton, start_gateway, profiles, tmp_path):
    create_key(tmp_path / "retrain.pem")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.received = []
    for_s = 4.0
    drift = {"profiles": [str(profiles / "classifier-1.json")], "window": {"kind": "count", "size": 200},
             "interval_s": 0.2, "min_count": 200, "thresholds": {"psi": 0.2, "output_js": None, "chi2_p": None}}
    retrain = {"for_s": for_s, "interval_s": 0.25, "webhook": f"http://127.0.0.1:{server.server_port}/hook",
               "signing_key": str(tmp_path / "retrain.pem")}
    gw = start_gateway(triton.grpc_url, outcomes={"url": "sqlite:///outcomes.db"}, routes={"classifier": {
        "target": {"backend": "triton", "model": "classifier", "version": 1}, "drift": drift,
        "outcomes": {"task": "classifier", "output": "probabilities", "retrain": retrain}}})
    try:
        shifted = np.random.default_rng(12).normal(size=(400, FEATURES)).astype(np.float32)
        shifted[:, :2] += 1.0
        send(gw, shifted)                          # the window of 200 holds only shifted traffic, and stays so
        deadline = time.monotonic() + 30
        while alerts(gw) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alerts(gw) >= 1
        while not Hook.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Hook.received, "no retrain event within 30 s of a persistent drift"
        first = Hook.received[0][0]
        time.sleep(for_s * 0.75)
        assert len(Hook.received) == 1, "one event per window"
        while len(Hook.received) < 2 and time.monotonic() < first + 3 * for_s:
            time.sleep(0.05)
    finally:
        server.shutdown()
    assert len(Hook.received) == 2 and Hook.received[1][0] - first == pytest.approx(for_s, abs=1.5)
    public = load_public_keys([tmp_path / "retrain.pem.pub"])
    events = [verify(body, headers, public) for _, body, headers in Hook.received]
    assert [e["kind"] for e in events] == ["drift", "drift"] and {e["version"] for e in events} == {"1"}
    assert events[1]["window"]["start"] == events[0]["window"]["end"], "the second window starts where the first ended"
    assert {"features[0]", "features[1]"} <= set(events[0]["evidence"]["figures"]["features"])
    assert events[0]["evidence"]["thresholds"]["features[0]"] == {"psi": 0.2}
    forged = Hook.received[0][1].replace(b'"drift"', b'"quality"')
    with pytest.raises(SignatureError):
        verify(forged, Hook.received[0][2], public)
    assert metric(gw, "infergate_retrain_events_total", model="classifier", version="1", kind="drift") == 2


def test_distribution_gate_rolls_back_a_canary_whose_predictions_depart(triton, start_gateway, profiles):
    routes = {"classifier": {
        "targets": {"v1": {"backend": "triton", "model": "classifier", "version": 1, "weight": 100},
                    "v2": {"backend": "triton", "model": "classifier", "version": 2}},
        "rollout": {"target": "v2", "steps": [50, 100], "dwell_s": 30, "min_requests": 50,
                    "max_error_rate_increase": 1, "max_p99_ratio": 100},
        "drift": {"profiles": [str(profiles / "classifier-1.json"), str(profiles / "classifier-2.json")],
                  "window": {"kind": "count", "size": 100}, "interval_s": 0.2, "min_count": 50,
                  "max_distribution_js": 0.1},
    }}
    gw = start_gateway(triton.grpc_url, routes=routes)
    rng = np.random.default_rng(3)
    deadline = time.monotonic() + 30
    phase = "progressing"
    while phase == "progressing" and time.monotonic() < deadline:
        send(gw, rng.normal(size=(CHUNK, FEATURES)).astype(np.float32))
        rollout = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/admin/routes").read())[0]["rollout"]
        phase = rollout["phase"]
    assert phase == "rolled_back"
    age = time.time() - datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()  # models/classifier/config.pbtxt
    assert metric(gw, "infergate_model_age_seconds", model="classifier", version="2") == pytest.approx(age, abs=60)
    assert "prediction distribution departs from the primary's" in rollout["reason"]
    assert metric(gw, "infergate_rollout_events_total", model="classifier", event="rolled_back") == 1


def test_counts_of_every_worker_are_merged(triton, start_gateway, profiles):
    """Two workers: each bins what it serves; the leader judges the sum of both."""
    drift = {"profiles": [str(profiles / "classifier-1.json")], "window": {"kind": "decay", "half_life_s": 1e6},
             "interval_s": 0.2}
    gw = start_gateway(triton.grpc_url, workers=2, routes={"classifier": {
        "target": {"backend": "triton", "model": "classifier", "version": 1}, "drift": drift}})
    gw.wait_workers(2)
    rows = np.random.default_rng(5).normal(size=(16, 25, FEATURES)).astype(np.float32)
    for chunk in rows:  # a new connection per chunk: SO_REUSEPORT spreads them over both workers
        send(gw, chunk)
    time.sleep(1.0)
    assert metric(gw, "infergate_drift_window_requests", model="classifier", version="1") == pytest.approx(400, rel=1e-3)
    shared = Path(psutil.Process(gw.proc.pid).children()[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
    published = [f for f in shared.glob("drift-*.json")]
    assert len(published) == 1, "the non-leader worker publishes its counts"
    other = Counts.from_bytes(base64.b64decode(json.loads(published[0].read_text())[0][1]))
    assert 0 < other.n < 400, "both workers served part of the traffic"


def test_typed_contents_are_answered_not_binned(triton, start_gateway, profiles):
    """A request with typed `contents` instead of raw bytes is served as usual on a drift route."""
    from gateway.protocol.wire import pb, pb_grpc
    import grpc

    gw = start_gateway(triton.grpc_url, routes={"classifier": {
        "target": {"backend": "triton", "model": "classifier", "version": 1},
        "drift": {"profiles": [str(profiles / "classifier-1.json")], "interval_s": 0.2}}})
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, FEATURES])
    tensor.contents.fp32_contents.extend([0.0] * FEATURES)
    answer = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc_url)).ModelInfer(request, timeout=10)
    assert answer.outputs[0].name == "probabilities"
