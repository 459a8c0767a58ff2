"""The retrain signal: persistence over simulated time fires exactly one event per window, the
webhook body reaches a real local HTTP server signed so that it verifies (and a changed body
does not), deliveries are retried and counted, and nothing the webhook does reaches the caller."""
from __future__ import annotations

import argparse
import asyncio
import logging
import re
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from gateway.audit.chain import create_key, key_id, load_public_keys
from gateway.outcomes.retrain import (KEY_ID_HEADER, SIGNATURE_HEADER, PersistenceTracker, RetrainEmitter,
                                      SignatureError, add_retrain_arguments, drift_evidence, quality_evidence,
                                      retrain_command, sign_body, verify)
from tests.conftest import free_port, serve_hook

DRIFTING = drift_evidence({"features[3]": {"psi": 0.31}}, {"features[3]": {"psi": 0.2}}, window_requests=1000)
CALM = drift_evidence({})
UNJUDGED = drift_evidence(None)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(tracker: PersistenceTracker, clock: Clock, readings: list, step: float = 10.0) -> list:
    """Feed one reading per step of simulated time; the events that fired."""
    fired = []
    for evidence in readings:
        event = tracker.observe("fraud", "2", evidence)
        if event is not None:
            fired.append(event)
        clock.t += step
    return fired


def test_persistent_drift_fires_exactly_once_per_window():
    clock = Clock()
    start = clock.t
    tracker = PersistenceTracker({"drift": 100.0}, clock)
    events = run(tracker, clock, [DRIFTING] * 26)          # 0 .. 250 s: 2.5 windows of persistence
    assert [(e.window_start - start, e.window_end - start) for e in events] == [(0, 100), (100, 200)]
    assert len({e.id for e in events}) == 2
    assert events[0].kind == "drift" and events[0].evidence.figures["features"] == {"features[3]": {"psi": 0.31}}
    assert tracker.holding_since("fraud", "2", "drift") == start + 200


def test_a_cleared_condition_restarts_the_window_and_an_unjudged_reading_neither_fires_nor_clears():
    clock = Clock()
    start = clock.t
    tracker = PersistenceTracker({"drift": 100.0}, clock)
    # 0..90 holding, cleared at 100, holding again from 110: the next event only at 210
    events = run(tracker, clock, [DRIFTING] * 10 + [CALM] + [DRIFTING] * 11)
    assert [(e.window_start - start, e.window_end - start) for e in events] == [(110, 210)]
    clock.t, tracker = start, PersistenceTracker({"drift": 100.0}, clock)
    # not judged from 50 to 140 (too few requests): the window started at 0 goes on, and fires only on a holding reading
    events = run(tracker, clock, [DRIFTING] * 5 + [UNJUDGED] * 10 + [DRIFTING] * 2)
    assert [(e.window_start - start, e.window_end - start) for e in events] == [(0, 150)]
    assert tracker.holding_since("fraud", "2", "quality") is None


def test_each_kind_and_version_persists_on_its_own_clock():
    clock = Clock()
    tracker = PersistenceTracker({"drift": 100.0, "quality": 50.0}, clock)
    fired = []
    for _ in range(11):
        for version, evidence in (("1", DRIFTING), ("2", DRIFTING), ("2", quality_evidence("accuracy", 0.7, 500, floor=0.8))):
            if (event := tracker.observe("fraud", version, evidence)) is not None:
                fired.append((version, event.kind, event.window_end - event.window_start))
        clock.t += 10.0
    assert sorted(fired) == [("1", "drift", 100), ("2", "drift", 100), ("2", "quality", 50), ("2", "quality", 50)]


def test_quality_decay_is_judged_in_the_metric_direction_against_floor_and_baseline():
    assert quality_evidence("accuracy", 0.72, 500, floor=0.8).holding is True
    assert quality_evidence("accuracy", 0.85, 500, floor=0.8).holding is False
    assert quality_evidence("log_loss", 0.9, 500, floor=0.5).holding is True      # lower is better: past a ceiling
    assert quality_evidence("log_loss", 0.4, 500, floor=0.5).holding is False
    dropped = quality_evidence("accuracy", 0.86, 500, baseline=0.91, max_drop=0.03)
    assert dropped.holding is True and dropped.figures["drop"] == pytest.approx(0.05)
    assert "baseline 0.91" in dropped.summary
    assert quality_evidence("rmse", 1.2, 500, baseline=1.0, max_drop=0.5).holding is False
    few = quality_evidence("accuracy", 0.1, 20, floor=0.8, min_samples=100)
    assert few.holding is None and "20 labelled outcomes, 100 needed" in few.summary
    with pytest.raises(ValueError, match="higher is better"):
        quality_evidence("auc", 0.7, 500, floor=0.8)
    assert quality_evidence("auc", 0.7, 500, floor=0.8, higher_is_better=True).holding is True


# ---------------------------------------------------------------- the webhook


@pytest.fixture
def key(tmp_path: Path):
    return create_key(tmp_path / "retrain.pem")


@pytest.fixture
def public(tmp_path: Path, key):
    return load_public_keys([tmp_path / "retrain.pem.pub"])


def fire_one(clock: Clock) -> object:
    tracker = PersistenceTracker({"drift": 60.0}, clock)
    tracker.observe("fraud", "2", DRIFTING)
    clock.t += 60.0
    event = tracker.observe("fraud", "2", DRIFTING)
    assert event is not None
    return event


async def test_the_webhook_is_received_signed_logged_and_audited_and_a_changed_body_does_not_verify(
        tmp_path, key, public, caplog):
    received: list[tuple[bytes, dict[str, str]]] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        arrived.set()
        return web.Response(status=204)

    runner, url = await serve_hook(hook)
    audited: list[dict] = []
    emitter = RetrainEmitter(url, key, audit=audited.append, clock=Clock(1_800_000_100.0))
    event = fire_one(Clock())
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.outcomes.retrain"):
            emitter.emit(event)
        await asyncio.wait_for(arrived.wait(), 10)
        await emitter.close()
    finally:
        await runner.cleanup()
    body, headers = received[0]
    assert headers[KEY_ID_HEADER] == key_id(key.public_key()) and headers["Content-Type"] == "application/json"
    doc = verify(body, headers, public)
    assert doc == verify(body, headers, key.public_key()) == audited[0]
    assert (doc["id"], doc["model"], doc["version"], doc["kind"]) == (event.id, "fraud", "2", "drift")
    assert doc["window"] == {"start": "2027-01-15T08:00:00.000000Z", "end": "2027-01-15T08:01:00.000000Z", "for_s": 60.0}
    assert doc["evidence"] == {"figures": {"features": {"features[3]": {"psi": 0.31}}, "window_requests": 1000},
                               "thresholds": {"features[3]": {"psi": 0.2}}}
    assert doc["emitted_at"] == "2027-01-15T08:01:40.000000Z"
    assert emitter.delivered == 1 and emitter.failed == 0
    assert any(event.id in r.getMessage() and "features[3]: psi=0.31" in r.getMessage() for r in caplog.records)

    tampered = body.replace(b'"psi":0.31', b'"psi":0.01')
    assert tampered != body
    with pytest.raises(SignatureError, match="bad signature"):
        verify(tampered, headers, public)
    stranger = create_key(tmp_path / "stranger.pem").public_key()
    with pytest.raises(SignatureError, match=f"signed by key {key_id(key.public_key())}, not by key {key_id(stranger)}"):
        verify(body, headers, stranger)
    with pytest.raises(SignatureError, match="unknown key"):
        verify(body, {**headers, KEY_ID_HEADER: "0" * 16}, public)
    with pytest.raises(SignatureError, match="no 'X-Infergate-Signature"):
        verify(body, {KEY_ID_HEADER: headers[KEY_ID_HEADER]}, public)


async def test_a_failing_webhook_is_retried_with_the_same_signed_body(key, public):
    answers = [503, 429, 200]
    seen: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append((await request.read(), request.headers[SIGNATURE_HEADER]))
        return web.Response(status=answers[len(seen) - 1])

    runner, url = await serve_hook(hook)
    emitter = RetrainEmitter(url, key, attempts=4, backoff_s=0.01)
    try:
        assert await emitter.deliver("fraud", b'{"type":"infergate.retrain","id":"x"}') is True
        answers[:] = [400]
        seen.clear()
        assert await emitter.deliver("fraud", b'{"type":"infergate.retrain","id":"y"}') is False  # refused: not retried
        assert len(seen) == 1
    finally:
        await emitter.close()
        await runner.cleanup()
    assert emitter.delivered == 1 and emitter.failed == 1


async def test_an_unreachable_webhook_is_retried_counted_and_never_raises(key, caplog):
    port = free_port()  # nothing listens there
    emitter = RetrainEmitter(f"http://127.0.0.1:{port}/hook", key, attempts=3, backoff_s=0.01, timeout_s=2.0)
    with caplog.at_level(logging.INFO, logger="gateway.outcomes.retrain"):
        emitter.emit(fire_one(Clock()))        # returns at once: the delivery runs on its own task
        assert emitter.failed == 0
        await emitter.close(timeout_s=10.0)
    assert emitter.failed == 1 and emitter.delivered == 0
    tries = [m.group(1) for r in caplog.records if (m := re.search(r"(try \d of \d) failed: ClientConnectorError", r.getMessage()))]
    assert tries == ["try 1 of 3", "try 2 of 3", "try 3 of 3"]
    assert any("not delivered" in r.getMessage() for r in caplog.records)


async def test_a_failing_audit_hook_or_a_missing_loop_never_reaches_the_caller(key):
    def broken(doc: dict) -> None:
        raise RuntimeError("audit queue gone")

    emitter = RetrainEmitter(None, None, audit=broken)
    emitter.emit(fire_one(Clock()))           # logged, not raised
    assert emitter.failed == 0                # no webhook: nothing to deliver
    with pytest.raises(ValueError, match="signing key"):
        RetrainEmitter("http://127.0.0.1:1/hook", None)


def test_emitting_without_a_running_loop_counts_a_failure(key):
    emitter = RetrainEmitter("http://127.0.0.1:1/hook", key)
    emitter.emit(fire_one(Clock()))
    assert emitter.failed == 1


def test_the_cli_verifies_a_received_body(tmp_path: Path, key, capsys):
    body = b'{"id":"e1","type":"infergate.retrain"}'
    headers = sign_body(body, key)
    (tmp_path / "body.json").write_bytes(body)
    (tmp_path / "changed.json").write_bytes(body.replace(b"e1", b"e2"))
    parser = argparse.ArgumentParser()
    add_retrain_arguments(parser.add_subparsers(dest="retrain_command"))

    def cli(name: str) -> int:
        return retrain_command(parser.parse_args(["verify", "--body", str(tmp_path / name), "--signature",
                                                  headers[SIGNATURE_HEADER], "--key-id", headers[KEY_ID_HEADER],
                                                  "--public-key", str(tmp_path / "retrain.pem.pub")]))

    assert cli("body.json") == 0 and orjson.loads(capsys.readouterr().out)["id"] == "e1"
    one_key = ["verify", "--body", str(tmp_path / "body.json"), "--signature", headers[SIGNATURE_HEADER],
               "--public-key", str(tmp_path / "retrain.pem.pub")]
    assert retrain_command(parser.parse_args(one_key)) == 0, "one public key needs no key id"
    capsys.readouterr()
    assert cli("changed.json") == 1 and "bad signature" in capsys.readouterr().err
