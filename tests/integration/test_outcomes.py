"""Outcomes end to end (issue #10) against the real Triton and real gateway processes, with
unmodified clients: answers remembered on the request path and outcomes posted back over HTTP
(JSON) and gRPC (infergate.v1.Feedback), joined by request id or W3C trace id; every item's
fate (joined, unknown, expired, duplicate, invalid) and who may post; joins across a restart
(SQLite) and across two gateways (PostgreSQL); quality counters and `infergate report segments`
per segment against a direct computation; the rollout's A/B gate rolling a worse candidate
back and promoting a better one."""
from __future__ import annotations

import json
import math
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography.hazmat.primitives.asymmetric import rsa
from scipy import stats

from gateway.outcomes.sequential import Arm, decide
from gateway.protocol import feedback_pb2
from tests.conftest import ROOT, metric

FEATURES = 8
V1 = {"backend": "triton", "model": "classifier", "version": 1}
V2 = {"backend": "triton", "model": "classifier", "version": 2}
ISSUER, AUDIENCE = "https://idp.infergate.test/", "infergate"
POST_OUTCOMES = "/infergate.v1.Feedback/PostOutcomes"
BUSINESS = {"converted": "rate", "revenue": "mean"}
SEGMENTS = {"region": {"header": "x-region", "values": ["eu", "us"]},
            "band": {"input": "features", "index": 0, "bins": [-1.0, 0.0, 1.0]}}
BANDS = ("<-1", "[-1,0)", "[0,1)", ">=1")
AB_TEST = {"outcome": "converted", "margin": 0.1, "confidence": 0.95, "min_samples": 20}


def outcomes(**extra: object) -> dict:
    return {"task": "classifier", "output": "probabilities", "business": BUSINESS, **extra}


def ab_route() -> dict:
    """A canary at 50% from the start whose only step ends in the A/B gate on `converted`
    (latency is not what these tests compare: its gate is wide open)."""
    return {"targets": {"primary": {**V1, "weight": 100}, "candidate": {**V2, "weight": 0}},
            "rollout": {"target": "candidate", "steps": [50], "dwell_s": 1, "min_requests": 10, "max_p99_ratio": 1000},
            "outcomes": outcomes(test=AB_TEST)}


ROUTES = {
    "clf": {"target": V2, "outcomes": outcomes(segments=SEGMENTS)},
    "brief": {"target": V1, "outcomes": outcomes(ttl_s=1)},      # predictions expire after a second
    "seg": {"target": V2, "outcomes": outcomes(segments=SEGMENTS)},
    "plain": {"target": V1},                                      # collects no outcomes
    "ab-worse": ab_route(),
    "ab-better": ab_route(),
}
# Anyone may infer; only callers whose token says team=labels may post outcomes.
ACCESS = [{"name": "tests", "anonymous": True, "actions": ["infer", "metadata", "admin"]},
          {"name": "labellers", "claims": {"team": "labels"}, "actions": ["feedback"]}]


@dataclass
class Issuer:
    """Signs bearer tokens the gateways verify against a JWKS file."""

    key: rsa.RSAPrivateKey
    jwks: Path

    @property
    def auth(self) -> dict:
        return {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(self.jwks)}}

    def token(self, team: str = "labels") -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"svc-{team}", "iat": now, "exp": now + 600, "team": team}
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    key = rsa.generate_private_key(65537, 2048)
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
                                          "kid": "k1", "use": "sig"}]}))
    return Issuer(key, jwks)


@pytest.fixture(scope="module")
def gw(triton, module_launcher, issuer, tmp_path_factory):
    """One gateway for most tests: its join store a SQLite file beside gateway.yaml, its audit log on."""
    directory = tmp_path_factory.mktemp("audit")
    gw = module_launcher.start(triton.grpc_url, routes=ROUTES, access=ACCESS, auth=issuer.auth,
                               outcomes={"url": "sqlite:///outcomes.db"},
                               audit={"dir": str(directory), "fsync_interval_s": 0.2})
    gw.audit_dir = directory
    return gw


def test_each_post_of_outcomes_is_audited(gw, issuer):
    with httpclient.InferenceServerClient(gw.http_url) as client:
        infer(client, "clf", features(1, 91), request_id="audited-1")
    status, answer = post(gw, "clf", [{"id": "audited-1", "label": 0}, {"id": "audited-never"}], issuer.token())
    assert status == 200 and fates(answer) == ["joined", "invalid"]
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run([sys.executable, "-m", "gateway", "audit", "query", str(gw.audit_dir), "--type=feedback"],
                             cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
        found = [json.loads(line) for line in out.splitlines() if line.strip()]
        mine = [r for r in found if r["statuses"] == {"joined": 1, "invalid": 1}]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mine and mine[-1]["model"] == "clf" and mine[-1]["principal"] == "svc-labels" and mine[-1]["outcomes"] == 2


def features(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def traceparent() -> tuple[str, str]:
    """A new trace id and the traceparent header that carries it."""
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


Client = grpcclient.InferenceServerClient | httpclient.InferenceServerClient


def infer(client: Client, model: str, x: np.ndarray, request_id: str = "",
          headers: dict | None = None) -> tuple[np.ndarray, str]:
    """The class probabilities of rows x and the backend version that answered."""
    kind = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    tensor = kind.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], request_id=request_id, headers=headers)
    response = result.get_response()
    return result.as_numpy("probabilities"), response["model_version"] if isinstance(response, dict) else response.model_version


def post(gw, model: str, items: list[dict] | None, token: str | None = None, body: bytes | None = None) -> tuple[int, dict]:
    """POST /v2/models/{model}/feedback: the HTTP status and the JSON answer."""
    data = json.dumps({"outcomes": items}).encode() if body is None else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://{gw.http_url}/v2/models/{model}/feedback", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_grpc(gw, model: str, items: list[dict], token: str | None = None) -> feedback_pb2.PostOutcomesResponse:
    """infergate.v1.Feedback/PostOutcomes through a plain generic stub; the items as post() takes them."""
    request = feedback_pb2.PostOutcomesRequest(model=model, outcomes=[
        feedback_pb2.Outcome(request_id=i.get("id", ""), trace_id=i.get("trace_id", ""), row=i.get("row", 0),
                             label=i.get("label"), business={k: float(v) for k, v in i.get("business", {}).items()})
        for i in items])
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = channel.unary_unary(POST_OUTCOMES, request_serializer=feedback_pb2.PostOutcomesRequest.SerializeToString,
                                   response_deserializer=feedback_pb2.PostOutcomesResponse.FromString)
        return stub(request, timeout=15, metadata=(("authorization", f"Bearer {token}"),) if token else None)


def fates(answer: dict | feedback_pb2.PostOutcomesResponse) -> list[str]:
    results = answer["results"] if isinstance(answer, dict) else answer.results
    return [r["status"] if isinstance(r, dict) else r.status for r in results]


def reasons(answer: dict | feedback_pb2.PostOutcomesResponse) -> list[str]:
    results = answer["results"] if isinstance(answer, dict) else answer.results
    return [r.get("reason", "") if isinstance(r, dict) else r.reason for r in results]


def posted(gw, model: str) -> dict[str, float]:
    """infergate_outcome_feedback_total of a model by status."""
    return {s: metric(gw, "infergate_outcome_feedback_total", model=model, status=s)
            for s in ("joined", "unknown", "expired", "duplicate", "invalid")}


def clients(gw) -> tuple[grpcclient.InferenceServerClient, httpclient.InferenceServerClient]:
    return grpcclient.InferenceServerClient(gw.grpc_url), httpclient.InferenceServerClient(gw.http_url)


# ---------------------------------------------------------------- the feedback API


def test_outcomes_join_by_request_id_and_by_trace_id_over_http_and_grpc(gw, issuer):
    g, h = clients(gw)
    token = issuer.token()
    x = features(7, seed=1)
    t_grpc, parent_grpc = traceparent()
    t_http, parent_http = traceparent()
    t_both, parent_both = traceparent()
    p = np.concatenate([infer(h, "clf", x[:1], request_id="j-http")[0],
                        infer(g, "clf", x[1:2], request_id="j-grpc")[0],
                        infer(g, "clf", x[2:3], headers={"traceparent": parent_grpc})[0],
                        infer(h, "clf", x[3:4], headers={"traceparent": parent_http})[0],
                        infer(g, "clf", x[4:5], request_id="j-both", headers={"traceparent": parent_both})[0],
                        infer(g, "clf", x[5:7], request_id="j-batch")[0]])    # two rows: an outcome names its row
    overall = dict(model="clf", segment="", value="")
    quality = ("joined", "labelled", "correct", "log_loss")
    before = posted(gw, "clf")
    counted = {q: metric(gw, f"infergate_outcome_{q}_total", **overall) for q in quality}
    business = {o: metric(gw, "infergate_outcome_business_total", **overall, outcome=o) for o in BUSINESS}

    status, answer = post(gw, "clf", [
        {"id": "j-http", "label": 1, "business": {"converted": True, "revenue": 12.5}},
        {"trace_id": t_grpc, "label": 0},
        {"id": "j-never", "label": 1},
        {"id": "j-batch", "row": 1, "label": 2},
        {"id": "j-batch", "row": 0, "label": 0},     # that prediction has its outcome: the first one wins
        {"trace_id": t_both, "label": 2},            # by trace id alone, though the request also had an id
    ], issuer.token())
    assert status == 200, answer
    assert fates(answer) == ["joined", "joined", "unknown", "joined", "duplicate", "joined"], answer
    assert answer["joined"] == 4
    assert "no such prediction" in reasons(answer)[2] and "first one posted" in reasons(answer)[4]

    answer = post_grpc(gw, "clf", [
        {"id": "j-grpc", "label": 2, "business": {"revenue": 3.0}},
        {"trace_id": t_http, "business": {"converted": False}},
        {"id": "j-http", "label": 0},
        {"id": "j-both", "label": 1},
        {"trace_id": secrets.token_hex(16), "label": 1},
    ], token)
    assert fates(answer) == ["joined", "joined", "duplicate", "duplicate", "unknown"], answer
    assert answer.joined == 2 and answer.results[0].reason == ""

    after = posted(gw, "clf")
    assert {s: after[s] - before[s] for s in after} == {"joined": 6, "unknown": 2, "expired": 0, "duplicate": 3, "invalid": 0}
    # what joined, row by row of p: j-http 1, trace 0, j-batch's row 1 (p[6]) 2, j-both 2, j-grpc 2; the other trace no label
    rows, labels = [0, 2, 6, 4, 1], np.array([1, 0, 2, 2, 2])
    expected = {"joined": 6, "labelled": 5, "correct": int((p[rows].argmax(1) == labels).sum()),
                "log_loss": -np.log(p[rows, labels]).sum()}
    for q in quality:
        assert metric(gw, f"infergate_outcome_{q}_total", **overall) - counted[q] == pytest.approx(expected[q], rel=1e-5), q
    assert {o: metric(gw, "infergate_outcome_business_total", **overall, outcome=o) - business[o] for o in BUSINESS} == \
        {"converted": 1.0, "revenue": 15.5}


def test_outcomes_that_cannot_join_are_answered_item_by_item(gw, issuer):
    g, _ = clients(gw)
    token = issuer.token()
    infer(g, "clf", features(1, seed=2), request_id="v-1")
    before = posted(gw, "clf")
    status, answer = post(gw, "clf", [
        {"id": "v-1", "business": {"clicks": 3}},         # not declared
        {"id": "v-1", "business": {"converted": 0.5}},    # a rate is true or false
        {"id": "v-1", "business": {"revenue": -1}},
        {"id": "v-1", "label": 1.5},                      # not a class index
        {"id": "v-1", "label": 7},                        # the model has three classes
        {"id": "v-1", "row": 4, "label": 0},              # the request had one row
        {"id": "v-1"},                                    # carries nothing
        {"trace_id": "not-a-trace-id", "label": 0},
        {"id": "v-1", "label": 1, "business": {"converted": True}},   # and a good one still joins
    ], token)
    assert status == 200, answer
    assert fates(answer) == ["invalid"] * 8 + ["joined"], answer
    why = reasons(answer)
    for i, words in enumerate(("'clicks' is not declared", "'converted' = 0.5", "'revenue' = -1", "not a class index",
                               "label 7 is not a class of this prediction (it has 3)", "row 4 is outside",
                               "neither a label nor a business outcome", "trace id")):
        assert words in why[i], (i, why[i])
    after = posted(gw, "clf")
    assert after["invalid"] - before["invalid"] == 8 and after["joined"] - before["joined"] == 1

    # non-finite numbers: JSON has none (the post is refused whole), protobuf does (the item is invalid)
    status, answer = post(gw, "clf", None, token, body=b'{"outcomes": [{"id": "v-1", "label": NaN}]}')
    assert status == 400 and "not JSON" in answer["error"]
    infer(g, "clf", features(1, seed=3), request_id="v-2")
    answer = post_grpc(gw, "clf", [{"id": "v-2", "label": math.nan}, {"id": "v-2", "business": {"revenue": math.inf}},
                                   {"id": "v-2", "label": 0}], token)
    assert fates(answer) == ["invalid", "invalid", "joined"], answer
    assert "finite" in answer.results[0].reason and "'revenue'" in answer.results[1].reason

    # a malformed post is refused whole
    for body, words in ((b'{"outcomes": []}', "no outcomes"), (b'{"outcomes": [{"id": 5}]}', "must be strings"),
                        (b'{"outcomes": [{"id": "v-1", "score": 1}]}', "unknown keys: score"), (b'[1]', "'outcomes' list")):
        status, answer = post(gw, "clf", None, token, body=body)
        assert status == 400 and words in answer["error"], (body, answer)
    with pytest.raises(grpc.RpcError) as refused:
        post_grpc(gw, "clf", [], token)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a model that keeps no outcomes, and one that does not exist
    status, answer = post(gw, "plain", [{"id": "x", "label": 0}], token)
    assert status == 400 and "does not collect outcomes" in answer["error"]
    assert post(gw, "nosuch", [{"id": "x", "label": 0}], token)[0] == 404
    with pytest.raises(grpc.RpcError) as refused:
        post_grpc(gw, "plain", [{"id": "x", "label": 0}], token)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_outcomes_past_the_time_to_live_are_expired(gw, issuer):
    g, h = clients(gw)
    trace_id, parent = traceparent()
    infer(g, "brief", features(1, seed=4), request_id="e-1")
    infer(h, "brief", features(1, seed=5), headers={"traceparent": parent})
    infer(g, "brief", features(1, seed=6), request_id="e-fresh")
    status, answer = post(gw, "brief", [{"id": "e-fresh", "label": 0}], issuer.token())
    assert fates(answer) == ["joined"], answer
    time.sleep(1.3)   # ttl_s: 1
    status, answer = post(gw, "brief", [{"id": "e-1", "label": 0}, {"trace_id": trace_id, "label": 1},
                                        {"id": "e-fresh", "label": 1}], issuer.token())
    assert status == 200 and fates(answer) == ["expired", "expired", "duplicate"], answer
    assert all("expired at" in r for r in reasons(answer)[:2])
    assert fates(post_grpc(gw, "brief", [{"id": "e-1", "label": 0}], issuer.token())) == ["expired"]
    assert metric(gw, "infergate_outcome_feedback_total", model="brief", status="expired") == 3


def test_posting_outcomes_needs_the_feedback_action(gw, issuer):
    g, _ = clients(gw)
    infer(g, "clf", features(1, seed=8), request_id="a-1")
    item = [{"id": "a-1", "label": 0}]
    status, answer = post(gw, "clf", item)
    assert status == 401 and "credentials required for feedback" in answer["error"], answer
    status, answer = post(gw, "clf", item, issuer.token("growth"))
    assert status == 403 and "'svc-growth' may not use feedback on model 'clf'" in answer["error"], answer
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (issuer.token("growth"), grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as refused:
            post_grpc(gw, "clf", item, token)
        assert refused.value.code() == code
    assert metric(gw, "infergate_access_decisions_total", principal="svc-growth", model="clf", action="feedback",
                  decision="deny") == 2
    assert fates(post_grpc(gw, "clf", item, issuer.token())) == ["joined"]   # the refused posts joined nothing


# ---------------------------------------------------------------- the store outlives a gateway, and is shared


def test_outcomes_join_across_workers_and_a_restart_with_sqlite(triton, start_gateway, issuer, tmp_path):
    """Two workers share one SQLite file: an outcome posted to either joins a prediction the other
    still holds in its queue (its writer gathers for 2 s). Predictions still queued at SIGTERM are
    written while the gateway drains, and the next gateway joins them."""
    store = tmp_path / "store" / "outcomes.db"
    settings = dict(routes={"clf": ROUTES["clf"]}, access=ACCESS, auth=issuer.auth,
                    outcomes={"url": f"sqlite:///{store}", "batch_s": 2})
    first = start_gateway(triton.grpc_url, workers=2, **settings)
    first.wait_workers(2)
    for i in range(8):   # a connection each: the kernel spreads them over both workers
        g, h = clients(first)
        infer(g if i % 2 else h, "clf", features(1, seed=100 + i), request_id=f"r-{i}")
    status, answer = post(first, "clf", [{"id": f"r-{i}", "label": i % 3} for i in range(8)], issuer.token())
    assert status == 200 and fates(answer) == ["joined"] * 8, answer
    assert metric(first, "infergate_outcome_joined_total", model="clf", segment="") == 8   # both workers' counters
    traces = []
    for i in range(8):
        g, h = clients(first)
        infer(g if i % 2 else h, "clf", features(1, seed=200 + i), request_id=f"q-{i}")
        trace_id, parent = traceparent()
        infer(g, "clf", features(1, seed=300 + i), headers={"traceparent": parent})
        traces.append(trace_id)
    assert first.stop() == 0
    assert "queued predictions are lost" not in (first.config_path.parent / "gateway.log").read_text()

    second = start_gateway(triton.grpc_url, **settings)
    items = [{"id": f"q-{i}", "label": i % 3} for i in range(8)] + [{"trace_id": t, "label": 0} for t in traces] + \
            [{"id": "r-0", "label": 1}]
    status, answer = post(second, "clf", items, issuer.token())
    assert status == 200 and fates(answer) == ["joined"] * 16 + ["duplicate"], answer
    assert metric(second, "infergate_outcome_joined_total", model="clf", segment="") == 16


def test_two_gateways_share_one_postgres_store(triton, start_gateway, postgres_server, issuer):
    """Answered by gateway a, joined through gateway b right away (b looks again for what a may
    still hold in its queue); a then sees the outcomes b joined. With PostgreSQL down, answers go
    on and posts are refused (UNAVAILABLE); once it is back, what a answered meanwhile joins."""
    settings = dict(routes={"clf": ROUTES["clf"]}, access=ACCESS, auth=issuer.auth, outcomes={"url": postgres_server.url})
    a = start_gateway(triton.grpc_url, **settings)
    b = start_gateway(triton.grpc_url, **settings)
    g, h = clients(a)
    traces = []
    for i in range(10):
        infer(g if i % 2 else h, "clf", features(1, seed=300 + i), request_id=f"p-{i}")
        trace_id, parent = traceparent()
        infer(h, "clf", features(1, seed=400 + i), headers={"traceparent": parent})
        traces.append(trace_id)
    items = [{"id": f"p-{i}", "label": 1, "business": {"converted": i % 2 == 0}} for i in range(10)] + \
            [{"trace_id": t, "label": 2} for t in traces]
    status, answer = post(b, "clf", items[:10], issuer.token())
    assert status == 200 and fates(answer) == ["joined"] * 10, answer
    assert fates(post_grpc(b, "clf", items[10:], issuer.token())) == ["joined"] * 10
    assert fates(post(a, "clf", items, issuer.token())[1]) == ["duplicate"] * 20
    assert metric(b, "infergate_outcome_joined_total", model="clf", segment="") == 20
    assert metric(b, "infergate_outcome_business_total", model="clf", segment="", outcome="converted") == 5
    assert metric(a, "infergate_outcome_joined_total", model="clf", segment="") == 0

    postgres_server.stop()
    for i in range(6):
        infer(g if i % 2 else h, "clf", features(1, seed=500 + i), request_id=f"d-{i}")
    status, answer = post(b, "clf", [{"id": "d-0", "label": 0}], issuer.token())
    assert status == 503 and "outcome store" in answer["error"], answer
    with pytest.raises(grpc.RpcError) as refused:
        post_grpc(b, "clf", [{"id": "d-0", "label": 0}], issuer.token())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    postgres_server.start()
    waiting = {f"d-{i}" for i in range(6)}
    deadline = time.monotonic() + 20
    while waiting:   # a's writer retries every half second; b reconnects
        assert time.monotonic() < deadline, waiting
        ids = sorted(waiting)
        status, answer = post(b, "clf", [{"id": i, "label": 0} for i in ids], issuer.token())
        waiting -= {i for i, fate in zip(ids, fates(answer) if status == 200 else []) if fate == "joined"}
        time.sleep(0.2)
    assert metric(a, "infergate_outcome_predictions_dropped_total") == 0


# ---------------------------------------------------------------- quality per segment


@dataclass
class Sent:
    """What the segment test sent and posted, one entry per request."""

    region: list[str]
    band: list[str]
    probs: np.ndarray
    label: np.ndarray
    converted: np.ndarray      # NaN: not posted
    revenue: np.ndarray        # NaN: not posted


def send_segment_traffic(gw, token: str, n: int = 240) -> Sent:
    """n one-row requests with a region header (eu, us, apac or none) and labels that are mostly
    right except in us; outcomes posted in one HTTP and one gRPC batch."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32) * 1.2
    regions = rng.choice(["eu", "us", "apac", ""], size=n, p=[0.35, 0.3, 0.2, 0.15])
    g, h = clients(gw)
    probs = np.zeros((n, 3))
    for i in range(n):
        headers = {"x-region": str(regions[i])} if regions[i] else None
        probs[i] = infer(g if i % 3 else h, "seg", x[i:i + 1], request_id=f"s-{i}", headers=headers)[0][0]
    right = rng.random(n) < np.where(regions == "us", 0.45, 0.9)
    label = np.where(right, probs.argmax(1), (probs.argmax(1) + rng.integers(1, 3, n)) % 3)
    converted = np.where(rng.random(n) < 0.7, (rng.random(n) < np.where(regions == "eu", 0.6, 0.3)).astype(float), np.nan)
    revenue = np.where(rng.random(n) < 0.5, np.round(rng.gamma(2.0, 10.0, n), 2), np.nan)
    items = []
    for i in range(n):
        business = {k: float(v) for k, v in (("converted", converted[i]), ("revenue", revenue[i])) if not np.isnan(v)}
        items.append({"id": f"s-{i}", "label": int(label[i]), **({"business": business} if business else {})})
    status, answer = post(gw, "seg", items[: n // 2], token)
    assert status == 200 and fates(answer) == ["joined"] * (n // 2), answer
    assert fates(post_grpc(gw, "seg", items[n // 2:], token)) == ["joined"] * (n - n // 2)
    band = [BANDS[int(np.searchsorted([-1.0, 0.0, 1.0], v, side="right"))] for v in x[:, 0].astype(np.float64)]
    return Sent([r if r in ("eu", "us") else "other" for r in regions], band, probs, label, converted, revenue)


def parse_report(text: str) -> dict[tuple[str, str], dict[str, tuple[int, float, float, bool]]]:
    """(metric, attribute) -> segment -> (n, value, p-value, flagged) from the Markdown report."""
    out: dict[tuple[str, str], dict[str, tuple[int, float, float, bool]]] = {}
    table = None
    for line in text.splitlines():
        head = re.match(r"(\S+) by (\w+): overall", line)
        if head:
            table = out.setdefault((head[1], head[2]), {})
        elif table is not None and line.startswith("| ") and not line.startswith("| segment"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[cells[0]] = (int(cells[1]), float(cells[2]), math.nan if cells[5] == "—" else float(cells[5]),
                               cells[6] == "FLAG")
    return out


def test_quality_per_segment_in_metrics_and_report_match_a_direct_computation(gw, issuer):
    sent = send_segment_traffic(gw, issuer.token())
    correct = sent.probs.argmax(1) == sent.label
    p_true = sent.probs[np.arange(len(sent.label)), sent.label.astype(int)]
    log_loss = -np.log(np.clip(p_true, 1e-15, 1))
    segments = {"": np.array([""] * len(correct)), "region": np.array(sent.region), "band": np.array(sent.band)}
    values = {"": [""], "region": ["eu", "us", "other"], "band": list(BANDS)}
    for attribute, column in segments.items():
        for value in values[attribute]:
            rows = column == value
            labels = dict(model="seg", segment=attribute, value=value)
            assert metric(gw, "infergate_outcome_joined_total", **labels) == rows.sum(), (attribute, value)
            assert metric(gw, "infergate_outcome_labelled_total", **labels) == rows.sum(), (attribute, value)
            assert metric(gw, "infergate_outcome_correct_total", **labels) == correct[rows].sum(), (attribute, value)
            assert metric(gw, "infergate_outcome_log_loss_total", **labels) == pytest.approx(log_loss[rows].sum(), rel=1e-4)
            for outcome, data in (("converted", sent.converted), ("revenue", sent.revenue)):
                having = rows & ~np.isnan(data)
                assert metric(gw, "infergate_outcome_business_observed_total", **labels, outcome=outcome) == having.sum()
                assert metric(gw, "infergate_outcome_business_total", **labels, outcome=outcome) == \
                    pytest.approx(data[having].sum(), rel=1e-9)

    confidence = sent.probs.max(1)
    for b in range(10):
        rows = np.minimum((confidence * 10).astype(int), 9) == b
        assert metric(gw, "infergate_outcome_calibration_total", model="seg", bin=str(b)) == rows.sum(), b
        assert metric(gw, "infergate_outcome_calibration_correct_total", model="seg", bin=str(b)) == correct[rows].sum(), b
        assert metric(gw, "infergate_outcome_confidence_total", model="seg", bin=str(b)) == \
            pytest.approx(confidence[rows].sum(), rel=1e-5)

    out = subprocess.run([sys.executable, "-m", "gateway", "report", "segments", "--config", str(gw.config_path),
                          "--model", "seg", "--min-n", "20"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = parse_report(out.stdout)
    assert f"{len(correct)} joined outcomes." in out.stdout
    terms = {"accuracy": (correct.astype(float), "z"), "log-loss": (log_loss, "t"),
             "converted": (sent.converted, "z"), "revenue": (sent.revenue, "t")}
    for (title, attribute), rows in sorted(report.items()):
        data, test = terms[title]
        column = segments[attribute]
        having = ~np.isnan(data)
        assert sum(n for n, *_ in rows.values()) == having.sum(), (title, attribute)
        for value, (n, shown, p_shown, _) in rows.items():
            mine = having & (column == value)
            rest = having & (column != value)
            assert n == mine.sum(), (title, attribute, value)
            assert shown == pytest.approx(data[mine].mean(), rel=1e-3, abs=1e-4), (title, attribute, value)
            if mine.sum() >= 20 and rest.sum() >= 20:
                p = two_proportion_p(data[mine], data[rest]) if test == "z" else \
                    stats.ttest_ind(data[mine], data[rest], equal_var=False).pvalue
                assert p_shown == pytest.approx(p, rel=5.1e-3, abs=1e-300), (title, attribute, value)
            else:
                assert math.isnan(p_shown)
    assert set(report) == {(t, a) for t in terms for a in ("region", "band")}
    # the planted disparity: accuracy in us (about 45%, the rest about 90%) is flagged
    flagged = [(t, a, v) for (t, a), rows in report.items() for v, row in rows.items() if row[3]]
    assert ("accuracy", "region", "us") in flagged, flagged
    assert re.search(r"\*\*Disparities flagged:\*\* .*accuracy for region=us", out.stdout), out.stdout


def two_proportion_p(a: np.ndarray, b: np.ndarray) -> float:
    """The pooled two-proportion z-test's two-sided p-value."""
    pooled = (a.sum() + b.sum()) / (len(a) + len(b))
    z = (a.mean() - b.mean()) / math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    return float(2 * stats.norm.sf(abs(z)))


# ---------------------------------------------------------------- the rollout's A/B gate


def route_state(gw, model: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{gw.admin_port}/admin/routes")
    return next(r for r in json.loads(urllib.request.urlopen(request, timeout=5).read()) if r["model"] == model)


@pytest.mark.parametrize("case, rates, phase, verdict", [
    ("worse", {"1": 0.8, "2": 0.2}, "rolled_back", -1),
    ("better", {"1": 0.5, "2": 0.9}, "promoted", 1),
])
def test_ab_gate_decides_on_business_outcomes(gw, issuer, case, rates, phase, verdict):
    """Every answer gets a `converted` outcome at a fixed rate per version (primary: classifier
    1, candidate: 2), in batches, until the controller decides."""
    model = f"ab-{case}"
    g, _ = clients(gw)
    token = issuer.token()
    seen: dict[str, list[float]] = {"1": [], "2": []}
    looks = []          # the arms after each batch: the gate's last look saw one of these
    x = features(1, seed=9)
    deadline = time.monotonic() + 5
    while metric(gw, "infergate_rollout_events_total", model=model, event="started") < 1:   # the step's window opens
        assert time.monotonic() < deadline, "the rollout did not start"
        time.sleep(0.1)
    answered = {"1": 0, "2": 0}
    while answered["2"] < 15:   # answers without outcomes (min_requests 10): the gate holds for want of evidence
        answered[infer(g, model, x)[1]] += 1
    deadline = time.monotonic() + 10
    while "no joined outcomes yet" not in route_state(gw, model)["rollout"]["reason"]:
        assert time.monotonic() < deadline, json.dumps(route_state(gw, model)["rollout"])
        time.sleep(0.1)
    assert route_state(gw, model)["rollout"]["phase"] == "progressing"
    assert metric(gw, "infergate_rollout_events_total", model=model, event="held") == 1
    deadline = time.monotonic() + 45
    while route_state(gw, model)["rollout"]["phase"] == "progressing":
        assert time.monotonic() < deadline, json.dumps(route_state(gw, model)["rollout"])
        items = []
        for i in range(40):
            request_id = f"{model}-{len(seen['1']) + len(seen['2'])}"
            version = infer(g, model, x, request_id=request_id)[1]
            k = len(seen[version])
            outcome = float(math.floor((k + 1) * rates[version]) - math.floor(k * rates[version]))   # exactly the rate
            seen[version].append(outcome)
            items.append({"id": request_id, "business": {"converted": bool(outcome)}})
        assert fates(post(gw, model, items, token)[1]) == ["joined"] * 40
        looks.append({v: np.array(o) for v, o in seen.items()})
        time.sleep(1.2)   # a controller tick reads the store
    state = route_state(gw, model)["rollout"]
    assert state["phase"] == phase, state
    assert state["percent"] == (0 if phase == "rolled_back" else 100)
    if phase == "rolled_back":
        assert "converted: worse than the primary" in state["reason"], state
    labels = dict(model=model, candidate="candidate", outcome="converted")
    assert metric(gw, "infergate_ab_decision", **labels) == verdict
    assert metric(gw, "infergate_rollout_events_total", model=model, event=phase) == 1
    # the gate's evidence was what was posted: its last look is what a direct computation over the
    # outcomes of some batch gives (each arm is read on its own: they may straddle one batch's commit)
    estimate, low = (metric(gw, "infergate_ab_difference", **labels, bound=b) for b in ("estimate", "low"))
    matching = []
    for i, j in ((i, j) for i in range(len(looks)) for j in range(len(looks)) if abs(i - j) <= 1):
        candidate, primary = looks[i]["2"], looks[j]["1"]
        if min(len(candidate), len(primary)) < AB_TEST["min_samples"]:
            continue
        mine = decide(*(Arm(len(a), a.sum(), (a * a).sum()) for a in (candidate, primary)), margin=AB_TEST["margin"],
                      alpha=1 - AB_TEST["confidence"], min_n=AB_TEST["min_samples"])
        if mine.estimate == pytest.approx(estimate, abs=1e-9) and mine.lower == pytest.approx(low, abs=1e-9):
            matching.append(mine.verdict)
    assert matching and set(matching) == {{-1: "worse", 1: "not_worse"}[verdict]}, (estimate, low, matching)
    served = {infer(g, model, x)[1] for _ in range(20)}
    assert served == ({"1"} if phase == "rolled_back" else {"2"})
