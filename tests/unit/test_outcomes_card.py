"""The model card: a real manifest (published and signed with the registry's code, installed into a
model config as registry-sync does, read back by the gateway's reader) beside live figures; the
live figures read from the real admin API and from the metrics the gateway's own code exports;
every missing part says so and why."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway.backends.triton import registry_manifest
from gateway.config import Backend, RoutingConfig
from gateway.frontends.admin import app as admin_app
from gateway.outcomes import quality
from gateway.outcomes.card import (DriftStatus, LiveFigures, NotAvailable, OnlineQuality, TrafficShare, drift_from,
                                   gather_live, parse_metrics, quality_from, render_card, traffic_from)
from gateway.registry.manifest import Manifest
from gateway.registry.publish import publish
from gateway.registry.repository import Installed, ModelRepository
from gateway.registry.signing import generate_key
from gateway.registry.store import TREE, DirectoryStore
from gateway.routing.table import compile_routes
from gateway.security.identity import Authenticator
from tests.conftest import free_port, serve_app

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = ROOT / "models" / "classifier"
TRAINED_AT = 1_767_225_600.0   # 2026-01-01T00:00:00Z
SECTIONS = ("Lineage", "Training data snapshot", "Evaluation metrics (declared by the producer)", "Intended use",
            "Limitations", "Traffic share", "Online quality", "Segment disparities", "Drift status", "Age")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[model_config_pb2.ModelConfig, str]:
    """The classifier's model config after registry-sync installed version 2 from the registry:
    published and signed, fetched, placed and its config.pbtxt written by the registry's code."""
    tmp = tmp_path_factory.mktemp("registry")
    generate_key(tmp / "producer.pem")
    manifest = Manifest(model="classifier", training_commit="abc123", dataset_snapshot="s3://data/fraud/2025-12-15",
                        trained_at="2026-01-01T00:00:00Z", feature_schema_version="3",
                        hyperparameters={"lr": 0.01, "optimizer": "adam"}, metrics={"accuracy": 0.91, "auc": 0.95},
                        risk_tier="high", intended_use="Ranking card transactions for manual fraud review.",
                        limitations="Not validated for merchants outside the EU.", producer="risk-ml")
    digest = publish(tmp / "registry", "classifier", CLASSIFIER / "2", CLASSIFIER / "config.pbtxt", manifest,
                     tmp / "producer.pem")
    repository = ModelRepository(tmp / "repository", tmp / "staging")
    staged = DirectoryStore(tmp / "registry").fetch("classifier", digest, repository.stage_dir("classifier", digest))
    repository.place(staged / TREE, "classifier", 2)
    repository.write_config("classifier", {2: Installed(digest, 1, manifest.trained_at, "2026-01-02T00:00:00Z")})
    config = model_config_pb2.ModelConfig()
    text_format.Parse((tmp / "repository" / "classifier" / "config.pbtxt").read_text(), config)
    return config, digest


@pytest.fixture(scope="module")
def model_config(installed) -> model_config_pb2.ModelConfig:
    return installed[0]


@pytest.fixture(scope="module")
def manifest(installed) -> dict:
    """Version 2's manifest as the gateway reads it from the model config."""
    config, digest = installed
    found = registry_manifest(config, "2")
    assert found is not None and found["digest"] == digest and found["training_commit"] == "abc123"
    return found


def live_figures(**changes) -> LiveFigures:
    rng = np.random.default_rng(7)
    scores = rng.dirichlet([1, 1, 1], 400)
    labels = np.where(rng.random(400) < 0.8, scores.argmax(1), rng.integers(0, 3, 400))
    q = quality.classifier_quality(scores, labels)
    region = np.where(np.arange(400) % 4 == 0, "apac", "eu")
    report = quality.disparity(region, quality.classifier_terms(scores, labels).correct, "accuracy", attribute="region")
    figures = dict(model="fraud", version="2", now=TRAINED_AT + 10 * 86400,
                   traffic=[TrafficShare("stable", "1", 90, 75, 300.0), TrafficShare("canary", "2", 10, 25, 100.0)],
                   quality=OnlineQuality({"accuracy": q.accuracy, "log_loss": q.log_loss, "calibration_error": q.ece},
                                         q.n, "the join store, last 24 hours"),
                   segments=quality.render_markdown(report),
                   drift=DriftStatus({"features[0]": {"psi": 0.02, "js": 0.01}, "features[3]": {"psi": 0.31, "js": 0.12}},
                                     ["features[3]"], 1000.0, False))
    return LiveFigures(**{**figures, **changes})


def section(card: str, title: str) -> str:
    """The text of one `## title` section."""
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_a_card_from_a_published_manifest_shows_each_declaration_and_live_figure(manifest):
    live = live_figures()
    card = render_card(manifest, live)
    assert card.startswith("# Model card: fraud version 2\n")
    assert [line[3:] for line in card.splitlines() if line.startswith("## ")] == list(SECTIONS)
    assert "Not available" not in card
    lineage = section(card, "Lineage")
    for value in ("| training commit | abc123 |", f"| digest | {manifest['digest']} |", "| risk tier | high |",
                  "| trained at | 2026-01-01T00:00:00Z |", "| feature schema version | 3 |", "| producer | risk-ml |",
                  '| hyperparameters | lr=0.01, optimizer="adam" |'):
        assert value in lineage
    assert section(card, "Training data snapshot").strip() == "`s3://data/fraud/2025-12-15`"
    assert "| accuracy | 0.91 |" in card and "| auc | 0.95 |" in card
    assert section(card, "Intended use").strip() == "Ranking card transactions for manual fraud review."
    assert section(card, "Limitations").strip() == "Not validated for merchants outside the EU."
    traffic = section(card, "Traffic share")
    assert "| canary (this version) | 2 | 10% | 25% | 100 | 25.0% |" in traffic
    assert "| stable | 1 | 90% | 75% | 300 | 75.0% |" in traffic
    online = section(card, "Online quality")
    q = live.quality
    assert f"Over {q.n} labelled outcomes: the join store, last 24 hours." in online
    assert f"| accuracy | {q.figures['accuracy']:.4g} | 0.91 |" in online       # beside the evaluation figure
    assert f"| log_loss | {q.figures['log_loss']:.4g} | — |" in online
    assert live.segments.strip() in section(card, "Segment disparities") and "| apac" in card
    drift = section(card, "Drift status")
    assert "**Alerting** on 1 of 2 monitored features: features[3]." in drift and "1000 requests" in drift
    assert "| features[3] (alert) | js=0.12, psi=0.31 |" in drift and "| features[0] | js=0.01, psi=0.02 |" in drift
    assert section(card, "Age").strip() == "10.0 days (trained at 2026-01-01T00:00:00Z)."


def test_missing_parts_say_they_are_not_available_and_why(manifest):
    card = render_card(NotAvailable("GET /admin/routes/fraud/manifests answered HTTP 403: forbidden"),
                       LiveFigures("fraud", "2", now=TRAINED_AT))
    assert [line[3:] for line in card.splitlines() if line.startswith("## ")] == list(SECTIONS)
    for title in SECTIONS:
        assert "_Not available: " in section(card, title), title
    assert card.count("answered HTTP 403: forbidden") >= 6    # the manifest's sections say why
    assert "_Not available: not gathered._" in section(card, "Drift status")
    assert "the gateway exports no model age" in section(card, "Age")

    bare = {k: v for k, v in manifest.items() if k not in ("intended_use", "limitations", "metrics")}
    card = render_card(bare, live_figures(traffic=[TrafficShare("stable", "1", 100, 100, None)],
                                          quality=OnlineQuality({}, 0, "the join store, last hour"), segments=""))
    for title in ("Intended use", "Limitations", "Evaluation metrics (declared by the producer)"):
        assert section(card, title).strip() == "_Not available: the registry manifest does not declare it._"
    assert "No target of fraud serves version 2 now" in section(card, "Traffic share")
    assert "| stable | 1 | 100% | 100% | — | — |" in section(card, "Traffic share")
    assert "no figure over the join store, last hour" in section(card, "Online quality")
    assert "the segment report is empty" in section(card, "Segment disparities")
    unreadable = render_card({**manifest, "trained_at": "yesterday"}, live_figures())
    assert "trained_at 'yesterday' unreadable" in section(unreadable, "Age")


# ---------------------------------------------------------------- live figures from the gateway


class ConfigBackend:
    """A backend whose model config is the one registry-sync wrote (no Triton in a unit test)."""

    name = "t"
    config = Backend(url="127.0.0.1:1", request_timeout_s=7)

    def __init__(self, model_config) -> None:
        self.model_config = model_config

    async def cached(self, method: str, model: str, version: str):
        assert method == "ModelConfig"
        return SimpleNamespace(config=self.model_config)


async def test_gather_live_reads_the_admin_api_of_a_gateway(model_config, manifest):
    routing = RoutingConfig.model_validate({
        "models": {"card-fraud": {"targets": {"stable": {"backend": "t", "model": "classifier", "version": 1, "weight": 90},
                                              "canary": {"backend": "t", "model": "classifier", "version": 2, "weight": 10}},
                                  "active": "canary"}},
        "access": [{"name": "ops", "anonymous": True, "actions": ["admin"]}]})
    table = compile_routes(routing, {"t": ConfigBackend(model_config)}, {}, {})
    live_routing = SimpleNamespace(table=table, states={})   # what the admin API's GET handlers read of LiveRouting
    runner, url = await serve_app(admin_app(lambda: True, live_routing, Authenticator(None), lambda *_: None))
    try:
        found, live = await gather_live(url, "card-fraud", "2", now=TRAINED_AT + 86400)
        unsynced, _ = await gather_live(url, "card-fraud", "1")
        unserved, _ = await gather_live(url, "card-fraud", "9")
        _, unknown = await gather_live(url, "no-such-route", "2")
    finally:
        await runner.cleanup()
    assert found == manifest
    assert live.traffic == [TrafficShare("stable", "1", 90, 0, 0.0), TrafficShare("canary", "2", 10, 100, 0.0)]
    assert isinstance(live.drift, NotAvailable) and "no drift profile" in live.drift.reason
    assert isinstance(live.quality, NotAvailable) and "no outcome joined" in live.quality.reason
    assert isinstance(unsynced, NotAvailable) and "not installed by registry-sync" in unsynced.reason
    assert isinstance(unserved, NotAvailable) and "no target of card-fraud serves version 9" in unserved.reason
    assert isinstance(unknown.traffic, NotAvailable) and "no route 'no-such-route'" in unknown.traffic.reason
    card = render_card(found, live)
    assert "| canary (this version) | 2 | 10% | 100% | 0 | — |" in card and "1.0 days (trained at" in card


async def test_an_unreachable_gateway_still_gives_a_card_saying_why():
    port = free_port()  # nothing listens there
    found, live = await gather_live(f"http://127.0.0.1:{port}", "fraud", "2", timeout_s=2.0)
    parts = (found, live.traffic, live.quality, live.drift)
    assert all(isinstance(p, NotAvailable) and "cannot read http://127.0.0.1" in p.reason for p in parts)
    card = render_card(found, live)
    assert card.count("_Not available: cannot read") >= 8


EXPORTER = textwrap.dedent("""
    import sys, types
    import orjson
    from prometheus_client import generate_latest
    from gateway.observability.metrics import Metrics
    from gateway.outcomes.hub import OutcomeHub
    from gateway.outcomes.records import Feedback, Joined, Prediction

    m = Metrics()
    m.requests.labels("fraud", "stable", "1", "grpc", "OK").inc(290)
    m.requests.labels("fraud", "stable", "1", "grpc", "UNAVAILABLE").inc(10)
    m.requests.labels("fraud", "canary", "2", "http", "OK").inc(100)
    for feature, psi, firing in (("features[0]", 0.02, False), ("features[3]", 0.31, True)):
        m.drift_statistic("fraud", "2", feature, "psi", psi)
        m.drift_alert("fraud", "2", feature, firing, firing)
    m.drift_window("fraud", "2", 1000)
    m.model_age("fraud", "2", 3 * 86400.0, 30 * 86400.0)
    hub = types.SimpleNamespace(metrics=m.outcomes)
    recorder = types.SimpleNamespace(spec=types.SimpleNamespace(task="classifier"))
    for scores, label, region, converted in orjson.loads(sys.stdin.buffer.read()):
        p = Prediction("fraud", "", "0" * 32, "canary", "2", "weight", {"region": region}, [scores], 0.0, 1.0)
        OutcomeHub.count(hub, recorder, Joined(p, Feedback("fraud", label=label, business={"converted": converted}), 0.0))
    sys.stdout.buffer.write(generate_latest())
""")


@pytest.fixture(scope="module")
def exported() -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """The metrics text the gateway's own code exports for known traffic, drift and joined
    outcomes (in a child process: the families live in the process-wide registry)."""
    rng = np.random.default_rng(3)
    scores = rng.dirichlet([2, 1, 1], 300)
    labels = np.where(rng.random(300) < 0.7, scores.argmax(1), rng.integers(0, 3, 300))
    converted = (rng.random(300) < 0.2).astype(float)
    rows = [[s.tolist(), float(y), "eu", float(c)] for s, y, c in zip(scores, labels, converted)]
    text = subprocess.run([sys.executable, "-c", EXPORTER], input=orjson.dumps(rows), capture_output=True,
                          check=True, timeout=120, cwd=ROOT).stdout.decode()
    return text, scores, labels, converted


def test_live_figures_from_the_gateways_metrics_match_a_direct_computation(exported):
    text, scores, labels, converted = exported
    samples = parse_metrics(text)
    q = quality_from(samples, "fraud", "2")
    direct = quality.classifier_quality(scores, labels)
    assert q.n == 300
    assert q.figures["accuracy"] == pytest.approx(direct.accuracy, abs=1e-12)
    assert q.figures["log_loss"] == pytest.approx(direct.log_loss, rel=1e-9)
    assert q.figures["calibration_error"] == pytest.approx(direct.ece, rel=1e-9)
    assert q.figures["outcome:converted"] == pytest.approx(converted.mean(), abs=1e-12)
    assert isinstance(quality_from(samples, "fraud", "1"), NotAvailable)

    drift = drift_from(samples, "fraud", "2")
    assert drift.statistics == {"features[0]": {"psi": 0.02}, "features[3]": {"psi": 0.31}}
    assert list(drift.alerting) == ["features[3]"] and drift.window_requests == 1000 and drift.stale is False
    assert isinstance(drift_from(samples, "fraud", "1"), NotAvailable)

    routes = [{"model": "fraud", "targets": [{"name": "stable", "version": "1", "file_weight": 90, "serving": 90},
                                             {"name": "canary", "version": "2", "file_weight": 10, "serving": 10}]}]
    traffic = traffic_from(routes, "fraud", samples)
    assert [(t.target, t.requests) for t in traffic] == [("stable", 300.0), ("canary", 100.0)]
    card = render_card({}, LiveFigures("fraud", "2", traffic=traffic, quality=q, drift=drift, model_age_s=3 * 86400.0))
    assert "| canary (this version) | 2 | 10% | 10% | 100 | 25.0% |" in card
    assert f"| accuracy | {direct.accuracy:.4g} | — |" in card and "3.0 days (the gateway's figure" in card
    assert math.isfinite(q.figures["log_loss"])
