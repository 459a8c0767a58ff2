"""The retrain signal over the live route table, run by the rollout leader only (worker 0 of the
replica holding the lease), so one gateway deployment emits each event once. Every route whose
`outcomes` declare `retrain` is read every `interval_s`: the drift engine's alerts per judged
version, and online quality per version over the declared window from the join store. Each
reading goes to the route's PersistenceTracker; what fires leaves through its RetrainEmitter."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from gateway import config
from gateway.audit.chain import load_key
from gateway.drift.monitor import bound
from gateway.outcomes import quality
from gateway.outcomes.retrain import Evidence, PersistenceTracker, RetrainEmitter, drift_evidence, quality_evidence

if TYPE_CHECKING:
    from gateway.outcomes.hub import OutcomeHub
    from gateway.outcomes.records import Joined
    from gateway.routing.table import Route

log = logging.getLogger(__name__)

Alerts = Callable[[str], dict[str, dict[str, dict[str, float]]]]  # model -> version -> feature -> crossed statistics


@dataclass
class _Watched:
    """One route's retrain declaration at work: its windows, its emitter and its next reading."""

    spec: config.Retrain
    tracker: PersistenceTracker
    emitter: RetrainEmitter
    next_at: float = field(default=0.0)


class RetrainWatch:
    """Reads each route's evidence on its interval and emits what persisted (see the module docstring)."""

    def __init__(self, hub: OutcomeHub, alerts: Alerts | None, base: Path,
                 audit: Callable[[dict[str, Any]], None] | None, leads: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.time) -> None:
        """alerts: the drift engine's (DriftHub.alerts; None without one); base: the routing file's
        folder (signing keys are relative to it); audit: where each event's record goes."""
        self.hub = hub
        self.alerts = alerts
        self.base = base
        self.audit = audit
        self._leads = leads
        self._clock = clock
        self._watched: dict[str, _Watched] = {}

    async def run(self, routes: Callable[[], Iterable[Route]], tick_s: float = 0.25) -> None:
        """Look every tick_s while this process leads; never dies."""
        try:
            while True:
                await asyncio.sleep(tick_s)
                if not self._leads():
                    continue
                try:
                    await self.check(routes())
                except Exception:  # noqa: BLE001 - the retrain signal must never take the gateway down
                    log.exception("retrain check failed")
        finally:
            await self.close()

    async def check(self, routes: Iterable[Route]) -> None:
        """Read every route due now; forget routes whose retrain declaration is gone."""
        watched: dict[str, _Watched] = {}
        for route in routes:
            spec = route.spec.outcomes.retrain if route.spec.outcomes is not None else None
            if spec is None:
                continue
            entry = self._watched.get(route.public)
            if entry is None or entry.spec != spec:
                if entry is not None:
                    await entry.emitter.close()
                entry = self._start(spec)
            watched[route.public] = entry
            now = self._clock()
            if now < entry.next_at:
                continue
            entry.next_at = now + spec.interval_s
            try:
                readings = await self._readings(route.public, route.spec, now)
            except Exception as e:  # noqa: BLE001 - one route's unreadable evidence (the store down) skips it, not the rest
                log.warning("retrain %s: evidence not read: %s", route.public, e)
                continue
            for version, evidence in readings:
                event = entry.tracker.observe(route.public, version, evidence)
                if event is not None:
                    entry.emitter.emit(event)
        for public in set(self._watched) - set(watched):
            await self._watched[public].emitter.close()
        self._watched = watched

    async def close(self) -> None:
        """Let webhook deliveries under way finish (briefly) and close their clients."""
        for entry in self._watched.values():
            await entry.emitter.close()
        self._watched = {}

    def _start(self, spec: config.Retrain) -> _Watched:
        key = load_key(self.base / spec.signing_key) if spec.signing_key else None
        emitter = RetrainEmitter(spec.webhook, key, audit=self._audited if self.audit else None,
                                 metrics=self.hub.metrics, clock=self._clock)
        return _Watched(spec, PersistenceTracker({"drift": spec.for_s, "quality": spec.for_s}, self._clock), emitter)

    def _audited(self, document: dict[str, Any]) -> None:
        assert self.audit is not None
        self.audit({**document, "type": "retrain", "time": document["emitted_at"]})

    async def _readings(self, public: str, route: config.Route, now: float) -> list[tuple[str, Evidence]]:
        """(version, evidence) for every version with drift judged or labelled outcomes in the window."""
        outcomes = route.outcomes
        assert outcomes is not None and outcomes.retrain is not None
        spec = outcomes.retrain
        readings = []
        if spec.drift and self.alerts is not None:
            drift = route.drift
            for version, crossed in self.alerts(public).items():
                limits = {f: {s: b for s in stats if (b := bound(drift.features.get(f, drift.thresholds), f, s)) is not None}
                          for f, stats in crossed.items()} if drift is not None else None
                readings.append((version, drift_evidence(crossed, limits)))
        q = spec.quality
        if q is not None:
            joined = await asyncio.to_thread(self.hub.store.joined, public, None, now - q.window_s)
            for version, figure in version_quality(joined, outcomes.task, q.metric).items():
                readings.append((version, quality_evidence(q.metric, figure[0], figure[1], floor=q.floor,
                                                           baseline=q.baseline, max_drop=q.max_drop,
                                                           min_samples=q.min_samples)))
        return readings


def version_quality(joined: Iterable[Joined], task: str, metric: str) -> dict[str, tuple[float, int]]:
    """(metric value, labelled outcomes) per version over joined records: accuracy or log_loss of a
    classifier's score rows, mae or rmse of a regressor's first value."""
    rows: dict[str, list[list[float]]] = defaultdict(list)
    labels: dict[str, list[float]] = defaultdict(list)
    for j in joined:
        p, f = j.prediction, j.feedback
        if f.label is not None and f.row < len(p.rows) and p.rows[f.row]:
            rows[p.version].append(list(p.rows[f.row]))
            labels[p.version].append(f.label)
    out = {}
    for version, scores in rows.items():
        if task == "classifier" and metric in ("accuracy", "log_loss"):
            width = max(len(r) for r in scores)
            if any(len(r) != width for r in scores):
                continue
            c = quality.classifier_quality(np.asarray(scores), labels[version])
            out[version] = (c.accuracy if metric == "accuracy" else c.log_loss, c.n)
        elif task == "regressor" and metric in ("mae", "rmse"):
            r = quality.regressor_quality([s[0] for s in scores], labels[version])
            out[version] = (r.mae if metric == "mae" else r.rmse, r.n)
    return out
