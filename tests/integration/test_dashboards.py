"""The Grafana dashboards and Prometheus alert rules, proven against a real Prometheus.

A gateway in front of the session's Triton serves `double` and `classifier` with everything
that makes series appear: on classifier a v1/v2 canary with a rollout and a compared shadow, a
breaker, a rate limit, edge validation, fallback rules and a pinned `standby` target whose
backend is down (its retries run out of budget, its breaker opens, fallback rules answer); on
double a canary naming a version Triton lacks, which the error-rate gate rolls back. TLS on the
HTTP listener (a certificate expiring in 10 days), access rules that deny metadata on
classifier, a rejected routing reload, the audit log on. A real Prometheus (scripts/prometheus.sh) scrapes the
admin port every second and loads the rules file.

Outcomes (core scenario): classifier and double declare an `outcomes` section (classifier: a classifier with
two business outcomes, a header and an input segment, the rollout's A/B test on the label and a retrain
signal on accuracy whose webhook refuses every event; double: a regressor). Labels and business outcomes are
posted back over HTTP and gRPC for the answers, with an unknown id, a duplicate, an invalid item and a row
outside the batch; before that the join store's database is held locked by the test while answers keep
coming, so its queue fills and predictions are dropped. The canary's single step is 50%, so the A/B test
(over outcomes of answers since the step began) has every answer of both arms; it looks, and the rollout
promotes or holds. The accuracy floor is above what the labels give, so retrain events fire.

Then every PromQL expression of every panel target, annotation and model variable of every
dashboard in configs/grafana/, and every alert rule in configs/prometheus/infergate-rules.yml,
is evaluated through /api/v1/query and must return data. Dashboard variables are substituted as
Grafana would: $model -> classifier (double for the regressor panels of outcomes.json: MAE and RMSE exist for
a route with task regressor only), $target and $outcome -> .* (All), $window -> 5m, $__rate_interval -> 30s,
$__interval -> 15s, $__range -> 5m.
Alert rules are evaluated without their final comparison (every rule is written
`<expression> <comparison> <threshold>`): the expression must return series, so the rule reads
metrics that exist; the full rule is evaluated too, and the ones this traffic is built to trip
must be true.

The drift scenario (a `drift:` section on classifier, reference profiles made with
`infergate drift profile`, shifted traffic) is a separate parametrization that checks the
expressions reading drift metrics; it runs when the gateway's routing config has `drift`.
"""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tritonclient.utils import InferenceServerException

from gateway.protocol import feedback_pb2
from tests.certs import CertAuthority
from tests.conftest import ROOT, free_port, metric

PROMETHEUS = ROOT / "scripts" / "prometheus.sh"
RULES = ROOT / "configs" / "prometheus" / "infergate-rules.yml"
DASHBOARDS = sorted((ROOT / "configs" / "grafana").glob("*.json"))
MODEL = "classifier"           # what $model becomes: the model that has every kind of series
REGRESSOR = "double"           # ...except in expressions only a regressor route has series for (MAE, RMSE)
REGRESSOR_METRICS = re.compile(r"infergate_outcome_(abs|squared)_error_total")
FEATURES = 8
CATEGORICAL = 7                # classifier feature column profiled as categorical (codes 0..3)

# Grafana's built-in variables, as a dashboard over the last 5 minutes would have them ($model is
# substituted first, by `substitute`; multi-value variables as "All").
MODEL_VARIABLE = re.compile(r"\$\{model(?::\w+)?\}|\$model\b")
SUBSTITUTIONS = [
    (re.compile(r"\$\{(target|outcome)(?::\w+)?\}|\$(target|outcome)\b"), ".*"),
    (re.compile(r"\$\{window(?::\w+)?\}|\$window\b"), "5m"),
    (re.compile(r"\$\{__rate_interval\}|\$__rate_interval\b"), "30s"),
    (re.compile(r"\$\{__interval\}|\$__interval\b"), "15s"),
    (re.compile(r"\$\{__range_s\}|\$__range_s\b"), "300"),
    (re.compile(r"\$\{__range\}|\$__range\b"), "5m"),
]
DRIFT_METRICS = re.compile(r"infergate_drift_|infergate_model_age_seconds|infergate_model_stale")

# Rules the core traffic is built to trip (evaluated in full, they must return series).
TRIPPED = {"InfergateBreakerOpen", "InfergateRolloutRolledBack", "InfergateConfigReloadRejected",
           "InfergateTLSCertificateExpiresSoon", "InfergateOutcomePredictionsDropped", "InfergateRetrainRequested",
           "InfergateRetrainWebhookFailing"}
TRIPPED_BY_DRIFT = {"InfergateDriftAlert", "InfergateModelStale"}


SCENARIOS = ["core", "drift"]  # drift: the same checks with a drift section on classifier and shifted traffic


# ------------------------------------------------------------------ expressions


@dataclass(frozen=True)
class Expr:
    where: str      # dashboard file and panel, or rule name
    promql: str     # as written
    query: str      # what is sent to Prometheus

    @property
    def drift(self) -> bool:
        return bool(DRIFT_METRICS.search(self.promql))


def substitute(promql: str) -> str:
    promql = MODEL_VARIABLE.sub(REGRESSOR if REGRESSOR_METRICS.search(promql) else MODEL, promql)
    for pattern, value in SUBSTITUTIONS:
        promql = pattern.sub(value, promql)
    return promql


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))   # rows hold their panels when collapsed


def dashboard_expressions() -> list[Expr]:
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board["panels"]):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"{path.name}: {panel['title']} [{target['refId']}]"
                    found.append(Expr(where, target["expr"], substitute(target["expr"])))
        for note in board.get("annotations", {}).get("list", []):
            if note.get("expr"):
                found.append(Expr(f"{path.name}: annotation {note['name']}", note["expr"], substitute(note["expr"])))
        for var in board["templating"]["list"]:
            query = var.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query or "") if var["type"] == "query" else None
            if match:  # label_values(selector, label): the values are those of this query's series
                found.append(Expr(f"{path.name}: variable {var['name']}", query,
                                  substitute(f"count by ({match[2]}) ({match[1]})")))
    return found


COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def split_comparison(promql: str) -> tuple[str, str, str]:
    """(expression, operator, threshold) at the last top-level comparison of a rule's expr."""
    depth, quote, last = 0, "", None
    i = 0
    while i < len(promql):
        c = promql[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in COMPARISONS if promql.startswith(o, i)), None)
            if op:
                last = (i, op)
                i += len(op)
                continue
        i += 1
    if last is None:
        raise ValueError(f"no top-level comparison in {promql!r}")
    at, op = last
    return promql[:at].strip(), op, promql[at + len(op):].strip()


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def rule_expressions() -> list[Expr]:
    found = []
    for rule in rules():
        expression, op, threshold = split_comparison(rule["expr"])
        found.append(Expr(f"rule {rule['alert']} (without '{op} {threshold}')", rule["expr"], expression))
    return found


# ------------------------------------------------------------------ the stack


@dataclass
class Stack:
    scenario: str
    gw: object
    prometheus: str   # base URL

    def query(self, promql: str) -> dict:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            return json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as e:   # 400/422: the expression does not parse or evaluate
            return json.loads(e.read())


def prometheus(command: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROMETHEUS), *command.split()], env=env, capture_output=True, text=True, timeout=timeout)


def classify_direct(url: str, x: np.ndarray, version: str) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    out = []
    for start in range(0, len(x), 32):
        tensor = grpcclient.InferInput("features", [len(x[start:start + 32]), FEATURES], "FP32")
        tensor.set_data_from_numpy(x[start:start + 32])
        out.append(client.infer("classifier", [tensor], model_version=version).as_numpy("probabilities"))
    return np.concatenate(out)


def sample(rng: np.random.Generator, rows: int, shift: float = 0.0) -> np.ndarray:
    """Feature rows: N(0, 1) (columns 0 and 1 moved by shift), column 7 a category code 0..3."""
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    x[:, :2] += shift
    p = [0.4, 0.3, 0.2, 0.1] if shift == 0 else [0.1, 0.2, 0.3, 0.4]
    x[:, CATEGORICAL] = rng.choice(4, size=rows, p=p)
    return x


def drift_section(triton, directory: Path) -> dict:
    """Reference profiles of classifier v1 and v2 from a sample and Triton's answers."""
    x = sample(np.random.default_rng(7), 2000)
    np.save(directory / "reference.npy", x)
    profiles = []
    for version in ("1", "2"):
        np.save(directory / f"probs-{version}.npy", classify_direct(triton.grpc_url, x, version))
        out = directory / f"classifier-{version}.json"
        subprocess.run([sys.executable, "-m", "gateway", "drift", "profile", "--model", "classifier", "--version", version,
                        "--input", f"features={directory / 'reference.npy'}", "--categorical", f"features={CATEGORICAL}",
                        "--output", f"probabilities={directory / f'probs-{version}.npy'}",
                        "--trained-at", "2026-01-01T00:00:00Z", "--out", str(out)], cwd=ROOT, check=True, timeout=120)
        profiles.append(str(out))
    return {"profiles": profiles, "window": {"kind": "count", "size": 200}, "interval_s": 0.25, "min_count": 100,
            "thresholds": {"psi": 0.2, "chi2_p": 0.01, "output_js": 0.1}, "stale_after_s": 86400}


def routes(drift: dict | None, outcomes: dict | None = None) -> dict:
    """outcomes: the `outcomes` sections of classifier and double (core scenario)."""
    classifier = {
        "targets": {"v1": {"backend": "triton", "model": "classifier", "version": 1, "weight": 100},
                    "v2": {"backend": "triton", "model": "classifier", "version": 2},
                    "standby": {"backend": "standby", "model": "classifier", "version": 1}},
        "match": [{"header": "x-infergate-target", "value": "standby", "target": "standby"}],
        "shadows": [{"target": "v2", "rate": 1.0, "compare": {"atol": None, "argmax": True}}],
        "rollout": {"target": "v2", "steps": [10, 50, 100], "dwell_s": 2, "min_requests": 5,
                    "max_error_rate_increase": 0.5, "max_p99_ratio": 50},
        "breaker": {"failures": 16, "open_s": 60},
        "rate_limit": {"rate": 200, "burst": 100},
        "validation": {"mode": "reject", "inputs": {"features": {"min": -10, "max": 10}}},
        "fallback": {"features": {"f0": {"input": "features", "index": 0}}, "outputs": {"probabilities": "FP32"},
                     "rules": [{"name": "negative-f0", "when": "f0 < 0.0", "outputs": {"probabilities": [0.5, 0.3, 0.2]}}],
                     "default": {"name": "prior", "outputs": {"probabilities": [0.34, 0.33, 0.33]}}},
    }
    if drift is not None:
        classifier["drift"] = drift
    double = {   # a canary of a version Triton does not have: NOT_FOUND, and the error-rate gate rolls it back
        "targets": {"stable": {"backend": "triton", "model": "double", "version": 1, "weight": 100},
                    "next": {"backend": "triton", "model": "double", "version": 2}},
        "rollout": {"target": "next", "steps": [50], "dwell_s": 600, "min_requests": 5},
    }
    if outcomes is not None:
        classifier["outcomes"], double["outcomes"] = outcomes["classifier"], outcomes["double"]
        # one step at 50%, from before the first request: the A/B test, which counts outcomes of
        # answers since the step began, has every answer of both arms
        classifier["rollout"]["steps"] = [50]
    return {"classifier": classifier, "double": double}


def outcome_sections(webhook: str, signing_key: Path) -> dict:
    """classifier: a classifier with business outcomes, segments, the rollout's A/B test on the label
    (a wide margin: the two versions are alike) and a retrain signal on an accuracy floor the posted
    labels stay under; double: a regressor."""
    classifier = {
        "task": "classifier", "output": "probabilities",
        "business": {"converted": "rate", "revenue": "mean"},
        "segments": {"region": {"header": "x-region", "values": ["eu", "us", "apac"]},
                     "band": {"input": "features", "index": 0, "bins": [-1.0, 0.0, 1.0]}},
        "test": {"outcome": "label", "margin": 0.5, "confidence": 0.95, "min_samples": 10},
        "retrain": {"for_s": 1, "interval_s": 1, "drift": False, "webhook": webhook, "signing_key": str(signing_key),
                    "quality": {"metric": "accuracy", "floor": 0.95, "window_s": 3600, "min_samples": 10}},
    }
    return {"classifier": classifier, "double": {"task": "regressor", "output": "OUTPUT0"}}


STORE_QUEUE = 64   # the join store's queue (outcomes.queue_size): small, so the stall drill fills it quickly
ACCESS = [{"name": "anyone", "anonymous": True, "models": ["*"], "actions": ["infer", "admin", "feedback"]},
          {"name": "catalog", "anonymous": True, "models": ["double"], "actions": ["metadata"]}]


def wait_for(what: str, check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.1)


@dataclass(frozen=True)
class Answered:
    """An answer outcomes can be posted for: its request id and output."""

    model: str
    request_id: str
    output: np.ndarray


def infer(client, model: str, x: np.ndarray, kind=grpcclient, headers: dict | None = None, request_id: str = "",
          answers: list[Answered] | None = None) -> str:
    """The status code name of one inference call; answers, when given, gets the answer if it is OK."""
    name, output = ("features", "probabilities") if model == "classifier" else ("INPUT0", "OUTPUT0")
    tensor = kind.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    try:
        result = client.infer(model, [tensor], headers=headers, request_id=request_id)
    except InferenceServerException as e:
        return str(e.status()).removeprefix("StatusCode.")
    if answers is not None:
        answers.append(Answered(model, request_id, result.as_numpy(output)))
    return "OK"


async def burst(url: str, rows: np.ndarray) -> Counter:
    """One request per row, all at once."""
    client = grpcaio.InferenceServerClient(url)

    async def one(row: np.ndarray) -> str:
        tensor = grpcaio.InferInput("features", [1, FEATURES], "FP32")
        tensor.set_data_from_numpy(row[None])
        try:
            await client.infer("classifier", [tensor])
            return "OK"
        except InferenceServerException as e:
            return str(e.status()).removeprefix("StatusCode.")

    try:
        return Counter(await asyncio.gather(*(one(row) for row in rows)))
    finally:
        await client.close()


REGIONS = ["eu", "us", "apac", "mars"]   # x-region of classifier requests; "mars" is not declared: segment "other"


def drive(gw, ca: Path, scenario: str, answers: list[Answered] | None = None) -> Counter:
    """gRPC and HTTPS traffic to both models, the standby target, errors, a rate-limited burst,
    a validation rejection and an access denial, spread over a few seconds of scrapes. The
    answers of classifier and double go to `answers` (with request ids outcomes can name)."""
    grpc_ = grpcclient.InferenceServerClient(gw.grpc_url)
    https = httpclient.InferenceServerClient(gw.http_url, ssl=True, ssl_options={"ca_certs": str(ca)})
    rng = np.random.default_rng(5)
    shift = 1.0 if scenario == "drift" else 0.0
    codes: Counter = Counter()
    for i in range(100):
        region = {"x-region": REGIONS[i % len(REGIONS)]}
        codes["classifier grpc " + infer(grpc_, "classifier", sample(rng, 8, shift), headers=region,
                                         request_id=f"cg{i}", answers=answers)] += 1
        if i % 3 == 0:
            codes["classifier http " + infer(https, "classifier", sample(rng, 8, shift), httpclient, headers=region,
                                             request_id=f"ch{i}", answers=answers)] += 1
        if i % 4 == 0:
            codes["double grpc " + infer(grpc_, "double", np.ones((1, 4), np.float32), request_id=f"dg{i}",
                                         answers=answers)] += 1
        if i % 6 == 0:
            codes["double http " + infer(https, "double", np.ones((1, 4), np.float32), httpclient,
                                         request_id=f"dh{i}", answers=answers)] += 1
        if i % 5 == 0:
            codes["standby grpc " + infer(grpc_, "classifier", sample(rng, 1), headers={"x-infergate-target": "standby"})] += 1
        time.sleep(0.01)
    bad = sample(rng, 1)
    bad[0, 3] = 50.0
    for _ in range(3):
        codes["classifier invalid " + infer(grpc_, "classifier", bad)] += 1
    try:
        grpc_.get_model_metadata("classifier")
        codes["metadata OK"] += 1
    except InferenceServerException as e:
        codes["metadata " + str(e.status()).removeprefix("StatusCode.")] += 1
    for code, n in asyncio.run(burst(gw.grpc_url, sample(rng, 300, shift))).items():
        codes["burst " + code] += n
    return codes


def reload_drill(gw) -> None:
    """A routing file that does not load (rejected, the old routes stay), then the good one again."""
    routing = gw.config_path.parent / "routing.yaml"
    good = routing.read_text()
    routing.write_text("models: [\n")
    wait_for("rejected reload", lambda: metric(gw, "infergate_config_reloads_total", result="rejected") >= 1)
    routing.write_text(good)
    wait_for("good reload", lambda: metric(gw, "infergate_config_reloads_total", result="ok") >= 1)


def exported(gw, name: str, **labels: str) -> bool:
    """Whether the gateway's /metrics has a sample of name with these labels (whatever its value)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics").read().decode()
    return any(line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
               for line in text.splitlines())


class RefusingReceiver(http.server.ThreadingHTTPServer):
    """A retrain webhook that refuses every event with 400 (final: the gateway does not retry it)."""

    def __init__(self) -> None:
        self.posts = 0

        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.posts += 1
                self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/retrain"


def signing_key(path: Path) -> Path:
    path.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def stall_drill(gw) -> None:
    """The join store's SQLite file held locked by another process (the test) while answers keep
    coming: the writer waits on the lock, its queue fills, and what does not fit is dropped and
    counted (reason full); inference goes on. Then the lock is released and the writer catches up."""
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    x = sample(np.random.default_rng(11), 1)
    db = sqlite3.connect(gw.config_path.parent / "outcomes.db", isolation_level=None, timeout=10)
    codes: Counter = Counter()
    try:
        db.execute("BEGIN IMMEDIATE")   # the write lock: the writer's next batch waits for it (busy timeout 5 s)
        codes[infer(client, "classifier", x)] += 1
        time.sleep(0.3)                 # the writer has taken that answer and waits on the lock
        for _ in range(STORE_QUEUE + 40):
            codes[infer(client, "classifier", x)] += 1
            time.sleep(0.003)           # under the route's rate limit
        wait_for("predictions dropped", lambda: metric(gw, "infergate_outcome_predictions_dropped_total",
                                                       model="classifier", reason="full") >= 1, timeout=3)
    finally:
        db.execute("ROLLBACK")
        db.close()
    print(f"  stall drill: {dict(codes)}, dropped "
          f"{metric(gw, 'infergate_outcome_predictions_dropped_total', model='classifier'):.0f}")


def post_http(gw, ca: Path, model: str, items: list[dict]) -> dict:
    request = urllib.request.Request(f"https://{gw.http_url}/v2/models/{model}/feedback", method="POST",
                                     data=json.dumps({"outcomes": items}).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)),
                                             timeout=30).read())


def post_grpc(gw, model: str, items: list[dict]) -> dict:
    """The same items through infergate.v1.Feedback/PostOutcomes; the answer as the HTTP JSON reads."""
    outcomes = [feedback_pb2.Outcome(request_id=i.get("id", ""), row=i.get("row", 0), label=i.get("label"),
                                     business={k: float(v) for k, v in i.get("business", {}).items()}) for i in items]
    with grpc.insecure_channel(gw.grpc_url) as channel:
        post = channel.unary_unary("/infergate.v1.Feedback/PostOutcomes",
                                   request_serializer=feedback_pb2.PostOutcomesRequest.SerializeToString,
                                   response_deserializer=feedback_pb2.PostOutcomesResponse.FromString)
        answer = post(feedback_pb2.PostOutcomesRequest(model=model, outcomes=outcomes), timeout=30)
    return {"joined": answer.joined, "results": [{"status": r.status, "reason": r.reason} for r in answer.results]}


def outcome_items(answers: list[Answered], rng: np.random.Generator) -> dict[str, list[dict]]:
    """Per model, one outcome per answer: classifier labels right for about 80% of the rows they name,
    converted about 30% of the time with a revenue then (some items carry business outcomes only);
    double (a regressor doubling ones) labels near 2."""
    items: dict[str, list[dict]] = {"classifier": [], "double": []}
    for k, a in enumerate(answers):
        row = k % len(a.output)
        if a.model == "classifier":
            top = int(np.argmax(a.output[row]))
            converted = bool(rng.random() < 0.3)
            item = {"id": a.request_id, "row": row,
                    "business": {"converted": converted, "revenue": round(float(rng.exponential(20)), 2) if converted else 0.0}}
            if k % 7:
                item["label"] = top if rng.random() < 0.8 else (top + 1) % 3
        else:
            item = {"id": a.request_id, "row": row, "label": round(2.0 + float(rng.normal(0, 0.5)), 3)}
        items[a.model].append(item)
    return items


def feedback_drill(gw, ca: Path, answers: list[Answered]) -> None:
    """Outcomes for the answers, in two posts a few scrapes apart (rate() over a window sees the
    second), the first over HTTP and the second over gRPC, with an unknown id, a duplicate, an
    invalid item and a row outside the batch (invalid too); then the A/B test's look and the retrain events."""
    items = outcome_items([a for a in answers if a.request_id], np.random.default_rng(3))
    spare = items["classifier"].pop()   # for the bad row
    first = {model: batch[: len(batch) // 2] for model, batch in items.items()}
    second = {model: batch[len(batch) // 2:] for model, batch in items.items()}
    statuses: Counter = Counter()
    for model, batch in first.items():
        answer = post_http(gw, ca, model, batch)
        assert len(answer["results"]) == len(batch) and answer["joined"] > 0, answer
        statuses.update(f"{model} {r['status']}" for r in answer["results"])
    time.sleep(2.5)
    special = [{"id": "never-answered", "label": 0},                                    # unknown
               dict(first["classifier"][0]),                                            # duplicate
               {"id": spare["id"], "business": {"churned": True}},                      # invalid: not declared
               {"id": spare["id"], "row": 99, "label": 0}]                              # invalid: no such row
    for model, batch in second.items():
        extra = special if model == "classifier" else []
        answer = post_grpc(gw, model, batch + extra)
        assert len(answer["results"]) == len(batch) + len(extra), answer
        statuses.update(f"{model} {r['status']}" for r in answer["results"])
        if extra:
            fates = [r["status"] for r in answer["results"][-len(extra):]]
            assert fates == ["unknown", "duplicate", "invalid", "invalid"], answer["results"][-len(extra):]
    print(f"  feedback: {dict(sorted(statuses.items()))}")
    assert statuses["classifier joined"] >= 40 and statuses["double joined"] >= 20, statuses
    wait_for("an A/B look", lambda: exported(gw, "infergate_ab_decision", model="classifier"))
    wait_for("a retrain event", lambda: metric(gw, "infergate_retrain_events_total", model="classifier") >= 1)
    wait_for("a refused retrain webhook", lambda: metric(gw, "infergate_retrain_webhook_failures_total",
                                                         model="classifier") >= 1)


@pytest.fixture(scope="module", params=SCENARIOS)
def stack(request, triton, module_launcher, tmp_path_factory):
    scenario = request.param
    d = tmp_path_factory.mktemp(f"dashboards-{scenario}")
    ca = CertAuthority(d, "server")
    server = ca.issue("server", cn="infergate", dns=("localhost",), ips=("127.0.0.1",), server=True)  # 10 days left
    drift = drift_section(triton, d) if scenario == "drift" else None
    receiver = RefusingReceiver() if scenario == "core" else None
    outcomes = outcome_sections(receiver.url, signing_key(d / "retrain.pem")) if receiver else None
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]   # nothing listens there
    backends = {"triton": {"url": triton.grpc_url},
                "standby": {"urls": dead, "health_interval_s": 3600, "retries": 1, "retry_backoff_s": 0.001}}
    started = time.monotonic()
    store = {"outcomes": {"url": "sqlite:///outcomes.db", "queue_size": STORE_QUEUE}} if outcomes else {}
    gw = module_launcher.start("", routes=routes(drift, outcomes), access=ACCESS, backends=backends,
                               tls={"cert": str(server.cert), "key": str(server.key), "client_auth": "none",
                                    "listeners": ["http"], "reload_s": 1},
                               audit={"dir": str(d / "audit")}, **store)
    port = free_port()
    (d / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "infergate", "static_configs": [{"targets": [f"127.0.0.1:{gw.admin_port}"]}]}],
    }))
    env = dict(os.environ, PROMETHEUS_HOME=str(d / "prometheus"), PROMETHEUS_PORT=str(port),
               PROMETHEUS_CONFIG=str(d / "prometheus.yml"))
    started_prometheus = prometheus("start", env)
    if started_prometheus.returncode != 0:
        pytest.fail(f"scripts/prometheus.sh start failed:\n{started_prometheus.stdout}{started_prometheus.stderr}")
    try:
        s = Stack(scenario, gw, f"http://127.0.0.1:{port}")
        wait_for("first scrape", lambda: [r["value"][1] for r in s.query('up{job="infergate"}')["data"]["result"]] == ["1"])
        answers: list[Answered] = []
        codes = drive(gw, ca.pem, scenario, answers)
        print(f"\n[{scenario}] traffic by model, protocol and code: {dict(sorted(codes.items()))}")
        assert codes["burst RESOURCE_EXHAUSTED"] > 0 and codes["classifier invalid INVALID_ARGUMENT"] == 3
        # anonymous callers denied metadata learn UNAUTHENTICATED; either way a deny decision is counted
        assert codes["metadata UNAUTHENTICATED"] + codes["metadata PERMISSION_DENIED"] == 1
        assert codes["standby grpc OK"] == 20   # fallback answers while its backend is down
        reload_drill(gw)
        wait_for("double's canary rolled back",
                 lambda: metric(gw, "infergate_rollout_events_total", model="double", event="rolled_back") >= 1)
        assert metric(gw, "infergate_breaker_state", model="classifier", target="standby") == 2
        if scenario == "drift":
            wait_for("a drift alert", lambda: metric(gw, "infergate_drift_alerts_total", model="classifier") >= 1)
        else:
            stall_drill(gw)
            feedback_drill(gw, ca.pem, answers)
        time.sleep(3.5)   # three more scrapes: every series has two samples in a 30 s rate window
        print(f"[{scenario}] gateway, Prometheus and traffic ready in {time.monotonic() - started:.1f} s")
        yield s
    finally:
        prometheus("stop", env, timeout=30)
        gw.stop()
        if receiver is not None:
            receiver.shutdown()
            receiver.server_close()


# ------------------------------------------------------------------ tests


def test_dashboards_are_wellformed():
    """Import-ready Grafana JSON: schema 39, the datasource and model variables, every panel on
    ${datasource} with a query and a unit, unique ids, inside the 24-column grid."""
    assert {p.name for p in DASHBOARDS} == {"overview.json", "model.json", "drift.json", "rollout.json", "outcomes.json"}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["schemaVersion"] == 39 and board["uid"] and board["title"], path.name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["model"]["query"]["query"] == "label_values(infergate_requests_total, model)", path.name
        panels = list(_panels(board["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels:
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']} leaves the grid"
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", f"{path.name}: {panel['title']}"
            assert panel["targets"] and all(t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
                                            for t in panel["targets"]), f"{path.name}: {panel['title']} has no query"
            defaults = panel["fieldConfig"]["defaults"]
            assert defaults.get("unit") or defaults.get("mappings"), f"{path.name}: {panel['title']} has no unit"


def test_rules_pass_promtool():
    checked = prometheus(f"promtool check rules {RULES}", dict(os.environ))
    print(checked.stdout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for rule in rules():
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        split_comparison(rule["expr"])   # the house form: <expression> <comparison> <threshold>


def check(stack: Stack, expressions: list[Expr]) -> None:
    """Every expression of this scenario must answer with data, and every infergate metric it
    names must exist (an `or vector(0)` arm cannot hide a missing one); prints what was checked."""
    mine = [e for e in expressions if e.drift == (stack.scenario == "drift")]
    failed = []
    exists: dict[str, bool] = {}
    print(f"\n[{stack.scenario}] {len(mine)} expressions against {stack.prometheus} "
          f"({len(expressions) - len(mine)} belong to the other scenario):")
    for e in mine:
        answer = stack.query(e.query)
        if answer.get("status") != "success":
            verdict = f"ERROR {answer.get('errorType')}: {answer.get('error')}"
        else:
            result = answer["data"]["result"]
            verdict = f"{len(result) if isinstance(result, list) else 1} series" if result else "EMPTY"
        ok = verdict.endswith("series")
        for name in sorted(set(re.findall(r"\binfergate_\w+", e.query))):
            if name not in exists:
                exists[name] = bool(stack.query(f"count({name})").get("data", {}).get("result"))
            if not exists[name]:
                verdict, ok = f"{verdict}; NO SERIES of {name}", False
        query = " ".join(e.query.split())
        print(f"  {'ok ' if ok else 'FAIL'} {e.where}: {query}  -> {verdict}")
        if not ok:
            failed.append(f"{e.where}: {verdict}\n    {query}")
    assert not failed, f"{len(failed)} of {len(mine)} expressions returned nothing:\n" + "\n".join(failed)


def test_every_dashboard_expression_has_data(stack):
    check(stack, dashboard_expressions())


def test_every_rule_reads_existing_series(stack):
    check(stack, rule_expressions())


def test_rules_load_and_the_tripped_ones_fire(stack):
    """Prometheus loaded every rule and evaluates it without error; evaluated in full, the rules
    this scenario's traffic trips hold (their `for:` may keep them pending)."""
    loaded = json.loads(urllib.request.urlopen(f"{stack.prometheus}/api/v1/rules").read())["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError", "")) for g in loaded for r in g["rules"]}
    assert set(health) == {r["alert"] for r in rules()}
    assert all(h == "ok" for h, _ in health.values()), health
    holding = set()
    for rule in rules():
        result = stack.query(rule["expr"])["data"]["result"]
        if result:
            holding.add(rule["alert"])
        print(f"  {rule['alert']}: {'TRUE ' + str([r['metric'] for r in result]) if result else 'false'}")
    expected = TRIPPED_BY_DRIFT if stack.scenario == "drift" else TRIPPED
    assert expected <= holding, f"should hold but do not: {sorted(expected - holding)}"
