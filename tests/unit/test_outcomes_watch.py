"""The retrain watch over routes: a persistent drift alert raises exactly one event per window,
signed so that the received webhook body verifies and audited once; an alert that clears starts
the window again; quality decay read from a real SQLite join store fires too; a failing read
never stops the watch, and a process that does not lead emits nothing."""
from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from aiohttp import web

from gateway import config
from gateway.audit.chain import create_key, load_public_keys
from gateway.outcomes.records import Feedback, Prediction
from gateway.outcomes.retrain import verify
from gateway.outcomes.store import JoinStore
from gateway.outcomes.watch import RetrainWatch, version_quality
from tests.conftest import serve_hook

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def route(retrain: dict, task: str = "classifier", drift: dict | None = None) -> SimpleNamespace:
    """What the watch reads of a route: its public name, its outcomes and drift sections."""
    spec = config.Outcomes.model_validate({"task": task, "retrain": retrain})
    return SimpleNamespace(public="fraud", spec=SimpleNamespace(
        outcomes=spec, drift=config.Drift.model_validate(drift) if drift else None))


async def hook(received: list[tuple[bytes, dict[str, str]]]) -> tuple[web.AppRunner, str]:
    """A real local webhook receiver that keeps every POSTed body and its headers."""
    async def keep(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    return await serve_hook(keep)


async def test_a_persistent_drift_raises_one_signed_event_per_window(tmp_path: Path):
    create_key(tmp_path / "retrain.pem")
    received: list[tuple[bytes, dict[str, str]]] = []
    runner, url = await hook(received)
    clock, audited = Clock(), []
    alerts = {"2": {"features[3]": {"psi": 0.31}}}
    watch = RetrainWatch(SimpleNamespace(metrics=None), lambda model: alerts, tmp_path, audited.append, clock=clock)
    r = route({"for_s": 30, "interval_s": 10, "webhook": url, "signing_key": "retrain.pem"},
              drift={"profiles": ["fraud-2.profile"], "features": {"features[3]": {"psi": 0.25}}})
    try:
        for _ in range(13):              # readings at 0, 10, ..., 120 s: windows end at 30, 60, 90, 120
            await watch.check([r])
            clock.t += 10
        alerts["2"] = {}                 # the alert clears: the next window starts from scratch
        for _ in range(3):               # 130, 140, 150: calm
            await watch.check([r])
            clock.t += 10
        alerts["2"] = {"features[3]": {"psi": 0.4}}
        for _ in range(3):               # 160, 170, 180: holding, but not yet for 30 s
            await watch.check([r])
            clock.t += 10
        await watch.close()              # deliveries under way finish
    finally:
        await runner.cleanup()
    assert [a["type"] for a in audited] == ["retrain"] * 4
    windows = [(a["window"]["start"], a["window"]["end"]) for a in audited]
    assert len(set(windows)) == 4 and all(a["model"] == "fraud" and a["version"] == "2" for a in audited)
    assert len(received) == 4
    public = load_public_keys([tmp_path / "retrain.pem.pub"])
    events = [verify(body, headers, public) for body, headers in received]
    assert sorted(e["id"] for e in events) == sorted(a["id"] for a in audited)
    assert all(e["evidence"]["figures"]["features"]["features[3]"]["psi"] == 0.31 for e in events)
    assert events[0]["evidence"]["thresholds"] == {"features[3]": {"psi": 0.25}}


async def test_quality_decay_from_the_join_store_fires(tmp_path: Path):
    clock, audited = Clock(), []
    store = JoinStore(f"sqlite:///{tmp_path}/outcomes.db", settle_s=0)
    rng = np.random.default_rng(7)
    scores = rng.dirichlet(np.ones(3), size=60)
    labels = rng.integers(0, 3, size=60)      # random labels: accuracy about 1/3, below the floor
    for i, (row, label) in enumerate(zip(scores, labels)):
        store.remember(Prediction("fraud", f"r{i}", "", "a", "2", "weight", {}, [row.tolist()], T0 - 60, T0 + 3600))
    report = store.join([Feedback("fraud", f"r{i}", label=float(label)) for i, label in enumerate(labels)], T0)
    assert report.counts()["joined"] == 60
    watch = RetrainWatch(SimpleNamespace(metrics=None, store=store), None, tmp_path, audited.append, clock=clock)
    r = route({"for_s": 20, "interval_s": 10, "drift": False,
               "quality": {"metric": "accuracy", "floor": 0.8, "window_s": 3600, "min_samples": 50}})
    try:
        for _ in range(3):
            await watch.check([r])
            clock.t += 10
    finally:
        await watch.close()
        store.close()
    assert len(audited) == 1 and audited[0]["kind"] == "quality"
    expected = float(np.mean(scores.argmax(axis=1) == labels))
    assert audited[0]["evidence"]["thresholds"] == {"floor": 0.8, "min_samples": 50}
    assert audited[0]["evidence"]["figures"]["value"] == pytest.approx(expected)
    assert audited[0]["evidence"]["figures"]["n"] == 60


async def test_quality_worse_than_its_baseline_by_more_than_max_drop_fires(tmp_path: Path):
    clock, audited = Clock(), []
    store = JoinStore(f"sqlite:///{tmp_path}/outcomes.db", settle_s=0)
    rows = [[0.9, 0.1]] * 100                 # always class 0; labels: class 0 for 70 of 100 -> accuracy 0.7
    for i, row in enumerate(rows):
        store.remember(Prediction("fraud", f"r{i}", "", "a", "2", "weight", {}, [row], T0 - 60, T0 + 3600))
    store.join([Feedback("fraud", f"r{i}", label=float(i >= 70)) for i in range(100)], T0)
    watch = RetrainWatch(SimpleNamespace(metrics=None, store=store), None, tmp_path, audited.append, clock=clock)
    quality = {"metric": "accuracy", "baseline": 0.9, "window_s": 3600, "min_samples": 50}
    try:
        for max_drop, fired in ((0.25, 0), (0.15, 1)):   # 0.9 - 0.7 = 0.2: within 0.25, past 0.15
            audited.clear()
            r = route({"for_s": 10, "interval_s": 5, "drift": False, "quality": {**quality, "max_drop": max_drop}})
            for _ in range(3):
                await watch.check([r])
                clock.t += 5
            assert len(audited) == fired
    finally:
        await watch.close()
        store.close()
    assert audited[0]["evidence"]["figures"]["drop"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="go together"):
        config.RetrainQuality.model_validate({"baseline": 0.9})
    with pytest.raises(ValueError, match="needs a floor"):
        config.RetrainQuality.model_validate({"metric": "accuracy"})


def test_version_quality_matches_numpy():
    rng = np.random.default_rng(3)
    preds, labels = rng.normal(size=40), rng.normal(size=40)
    joined = [SimpleNamespace(prediction=SimpleNamespace(version="1" if i % 2 else "2", rows=[[float(p)]]),
                              feedback=SimpleNamespace(label=float(y), row=0)) for i, (p, y) in enumerate(zip(preds, labels))]
    got = version_quality(joined, "regressor", "rmse")
    for version, mask in (("1", np.arange(40) % 2 == 1), ("2", np.arange(40) % 2 == 0)):
        assert got[version][0] == pytest.approx(float(np.sqrt(np.mean((preds[mask] - labels[mask]) ** 2))))
        assert got[version][1] == 20


async def test_a_failing_read_does_not_stop_the_watch_and_only_the_leader_emits(tmp_path: Path):
    calls, audited, leading = 0, [], False
    clock = Clock()

    def alerts(model: str) -> dict:
        nonlocal calls
        calls += 1
        clock.t += 10
        if calls == 2:
            raise OSError("drift state unreadable")
        return {"2": {"f": {"psi": 0.5}}}

    watch = RetrainWatch(SimpleNamespace(metrics=None), alerts, tmp_path, audited.append, leads=lambda: leading,
                         clock=clock)
    r = route({"for_s": 30, "interval_s": 0.001})
    task = asyncio.create_task(watch.run(lambda: [r], tick_s=0.001))
    await asyncio.sleep(0.05)
    assert calls == 0                    # not leading: nothing read
    leading = True
    while calls < 12:
        await asyncio.sleep(0.002)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert 2 <= len(audited) <= 4 and all(a["kind"] == "drift" for a in audited)


def test_a_webhook_without_a_key_and_a_metric_that_does_not_fit_the_task_are_refused():
    with pytest.raises(ValueError, match="signing_key"):
        config.Retrain.model_validate({"webhook": "https://ci.example.org/hook"})
    with pytest.raises(ValueError, match="does not apply to task 'regressor'"):
        config.Outcomes.model_validate({"task": "regressor", "retrain": {"quality": {"metric": "accuracy", "floor": 0.9}}})
