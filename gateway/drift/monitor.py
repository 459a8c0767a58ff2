"""Drift monitors on the request path and the timer that judges them.

Each worker bins every answered request of a monitored target into its window (numba, on the
event loop: cheaper than any hop). Every `interval_s` each worker publishes its windows' counts
to a file in the shared metrics directory; the leader merges all live workers' counts, computes
the statistics against the reference profile, exports them and raises alerts. With one worker
nothing is written: the leader judges its own counts. With several replicas sharing Redis, the
leader first merges its replica's counts with every other replica's (drift/replicas.py).
"""
from __future__ import annotations

import asyncio
import logging
import base64
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import orjson

from gateway.config import Drift, DriftThresholds
from gateway.drift.profile import Profile, unix_time
from gateway.backends.triton import registry_manifest
from gateway.errors import GatewayError
from gateway.drift.state import Binner, Counts, Window
from gateway.drift.stats import compare, distribution_distance
from gateway.protocol.tensors import views
from gateway.protocol.wire import pb

if TYPE_CHECKING:
    from gateway.drift.replicas import ReplicaMerge

log = logging.getLogger(__name__)

SAMPLE_IDS = 8  # trace ids of recent requests a drift alert's log event carries
Key = tuple[str, str, str]  # public model, target name, profile version


@dataclass(eq=False)
class TargetMonitor:
    """One target's window over the version's profile, and the ids of its latest requests."""

    key: Key
    profile: Profile
    window: Window
    backend: Any = None                     # where the version's model config (and trained_at) lives
    trained_at: float | None = None         # the profile's, else the model config's `trained_at` parameter
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=SAMPLE_IDS))
    inputs: frozenset[str] = frozenset()    # the tensors the profile describes: only these are read
    outputs: frozenset[str] = frozenset()   # (no outputs: the answer is not even parsed)

    def __post_init__(self) -> None:
        self.trained_at = self.profile.trained_at
        self.inputs = frozenset(f.input for f in self.profile.features)
        self.outputs = frozenset(o.output for o in self.profile.outputs)

    skipped: int = 0  # requests whose tensors do not fit the profile (not binned, never failed)

    def record(self, request: pb.ModelInferRequest, response: bytes, trace_id: str) -> None:
        """Bin the request's inputs and the answer's outputs (zero-copy views of the raw bytes).
        A request that does not fit the profile is skipped: monitoring never fails an answer."""
        try:
            outputs = None
            if self.outputs:
                answer = pb.ModelInferResponse.FromString(response)
                outputs = views(answer.outputs, answer.raw_output_contents, self.outputs)
            self.window.record(views(request.inputs, request.raw_input_contents, self.inputs), outputs)
        except Exception as e:  # noqa: BLE001 - monitoring must never fail an answer already made
            if not self.skipped:
                log.warning("drift %s: a request does not fit the profile and is not counted: %s", self.key, e)
            self.skipped += 1
            return
        self.recent.append(trace_id)


class RouteDrift:
    """A route's monitors by target name: targets whose (model, version) has a profile."""

    def __init__(self, spec: Drift, monitors: Mapping[str, TargetMonitor]) -> None:
        self.spec = spec
        self.by_target = dict(monitors)


class DriftHub:
    """Every monitor of this worker (kept across routing reloads while the route's drift spec is
    unchanged), the cross-worker exchange, and — in the leader — judging and exporting."""

    def __init__(self, base: Path, metrics: Any, leader: bool, share: Path | None,
                 clock: Callable[[], float] = time.monotonic, replicas: ReplicaMerge | None = None) -> None:
        self.base = base  # the routing file's directory: profile paths are relative to it
        self.metrics = metrics
        self.leader = leader
        self.share = share
        self.replicas = replicas  # the leader's exchange with other replicas (None: this replica alone)
        self._clock = clock
        self._monitors: dict[Key, tuple[Drift, TargetMonitor]] = {}
        self._profiles: dict[Path, tuple[float, Profile]] = {}
        self.merged: dict[Key, Counts] = {}
        self._alerting: set[tuple[str, str, str]] = set()
        self._crossed: dict[tuple[str, str], dict[str, dict[str, float]]] = {}  # judged (model, version): alerts

    def route(self, public: str, spec: Drift, targets: Mapping[str, tuple[Any, str, str]]) -> RouteDrift:
        """The route's monitors for its targets (name -> (backend, model, version)); profiles are
        matched by model and version (an unversioned target by model, when it has one profile);
        a target without a profile is not monitored."""
        profiles = {(p.model, p.version): p for p in (self._profile(self.base / f) for f in spec.profiles)}
        monitors = {}
        for name, (backend, model, version) in targets.items():
            profile = profiles.get((model, version))
            if profile is None and not version:  # Triton picks the version: fine if the model has one profile
                only = [p for (m, _), p in profiles.items() if m == model]
                profile = only[0] if len(only) == 1 else None
            if profile is None:
                continue
            key = (public, name, profile.version)
            kept = self._monitors.get(key)
            if kept is None or kept[0] != spec or kept[1].profile is not profile:
                window = Window(spec.window, Binner(profile), self._clock)
                kept = self._monitors[key] = (spec, TargetMonitor(key, profile, window, backend))
            monitors[name] = kept[1]
        return RouteDrift(spec, monitors)

    def retain(self, keys: set[Key]) -> None:
        """Forget monitors the current route table no longer uses (removed routes, targets, versions)."""
        for key in set(self._monitors) - keys:
            del self._monitors[key]
        kept = {(model, version) for model, _, version in self._monitors}
        self._crossed = {k: v for k, v in self._crossed.items() if k in kept}

    def _profile(self, path: Path) -> Profile:
        """A profile file, re-read only when it changes."""
        mtime = path.stat().st_mtime
        cached = self._profiles.get(path)
        if cached is None or cached[0] != mtime:
            cached = self._profiles[path] = (mtime, Profile.load(path))
        return cached[1]

    async def run(self, specs: Callable[[], dict[str, Drift]]) -> None:
        """Publish (and, in the leader, merge across replicas and judge) every interval_s (the
        shortest any route asks for); never dies."""
        while True:
            interval = min((d.interval_s for d in specs().values()), default=5.0)
            await asyncio.sleep(interval)
            try:
                await self._training_times()
                merged = self.gather()
                if merged is not None:
                    if self.replicas is not None:
                        merged = await self.replicas.merge(merged, interval)
                    self.judge(specs(), merged)
            except Exception:  # noqa: BLE001 - drift must never take the gateway down
                log.exception("drift tick failed")

    async def _training_times(self) -> None:
        """Versions whose profile has no training time: ask Triton's model config once for the
        version's registry manifest (registry-sync writes it) or else a `trained_at` parameter
        (ISO 8601); a failed ask is tried again next tick."""
        for _, monitor in self._monitors.values():
            if monitor.trained_at is not None or monitor.backend is None:
                continue
            profile = monitor.profile
            try:
                config = (await monitor.backend.cached("ModelConfig", profile.model, profile.version)).config
            except GatewayError:
                continue
            monitor.backend, monitor.trained_at = None, math.nan  # NaN: asked, none declared
            manifest = registry_manifest(config, profile.version) or {}
            declared = manifest.get("trained_at") or (config.parameters["trained_at"].string_value
                                                      if "trained_at" in config.parameters else None)
            if declared:
                try:
                    monitor.trained_at = unix_time(str(declared))
                except ValueError as e:
                    log.warning("model %s version %s: trained_at unreadable: %s", profile.model, profile.version, e)

    def gather(self) -> dict[Key, Counts] | None:
        """This worker's judged counts: published for the leader (None), or in the leader merged
        with every live worker's."""
        mine = {key: monitor.window.judged() for key, (_, monitor) in self._monitors.items()}
        if self.share is not None and not self.leader:
            _publish(self.share / f"drift-{os.getpid()}.json", mine)
            return None
        merged = dict(mine)
        if self.share is not None:
            for other in _gather(self.share):
                for key, counts in other.items():
                    try:
                        merged[key] = merged[key].merge(counts) if key in merged else counts
                    except ValueError as e:  # a worker still on another profile layout (mid-reload)
                        log.warning("drift counts of %s from another worker skipped: %s", key, e)
        return merged

    def judge(self, specs: dict[str, Drift], merged: dict[Key, Counts]) -> None:
        """Export the statistics of the merged counts and raise or clear alerts; keep them for the rollout gate."""
        self.merged = merged
        for key, counts in merged.items():
            entry = self._monitors.get(key)
            spec = specs.get(key[0])
            if entry is not None and spec is not None:
                self._judge(entry[1], spec, counts)

    def _judge(self, monitor: TargetMonitor, spec: Drift, counts: Counts) -> None:
        """Export every statistic; alert on those past their thresholds (once the window holds min_count)."""
        model, _, version = monitor.key
        profile = monitor.profile
        self.metrics.drift_window(model, version, counts.n)
        if monitor.trained_at is not None and not math.isnan(monitor.trained_at):
            self.metrics.model_age(model, version, time.time() - monitor.trained_at, spec.stale_after_s)
        if counts.n < spec.min_count:
            self._crossed.pop((model, version), None)
            return
        report = compare(profile, counts)
        judged = dict(report.features)
        for name, stats in report.outputs.items():  # outputs are judged as two pseudo-features
            judged[f"output:{name}:argmax"] = {"js": stats["argmax_js"]}
            judged[f"output:{name}:probabilities"] = {"js": stats["prob_js"]}
        alerts = self._crossed[(model, version)] = {}
        for feature, statistics in judged.items():
            bounds = spec.features.get(feature, spec.thresholds)
            crossed = {}
            for name, value in statistics.items():
                self.metrics.drift_statistic(model, version, feature, name, value)
                if _past(bounds, feature, name, value):
                    crossed[name] = value
            if crossed:
                alerts[feature] = crossed
            self._alert(monitor, feature, crossed)

    def alerts(self, public: str) -> dict[str, dict[str, dict[str, float]]]:
        """Each judged version of a route's model: its alerting features and the statistics past
        their bounds (empty: none alerting). Versions not judged yet are absent. For the retrain signal."""
        return {version: dict(features) for (model, version), features in self._crossed.items() if model == public}

    def _alert(self, monitor: TargetMonitor, feature: str, crossed: dict[str, float]) -> None:
        model, _, version = monitor.key
        key = (model, version, feature)
        firing = bool(crossed)
        self.metrics.drift_alert(model, version, feature, firing, raised=firing and key not in self._alerting)
        if firing and key not in self._alerting:
            log.warning("drift alert: model %s version %s feature %s: %s; recent requests: %s",
                        model, version, feature, ", ".join(f"{k}={v:.3g}" for k, v in crossed.items()),
                        ", ".join(monitor.recent) or "-")
            self._alerting.add(key)
        elif not firing and key in self._alerting:
            log.info("drift alert cleared: model %s version %s feature %s", model, version, feature)
            self._alerting.discard(key)

    def distance(self, public: str, canary: str, baseline: str) -> float | None:
        """JS distance between two targets' merged argmax distributions of the profile's first
        output (None until both have counts, or without an output profile)."""
        found = {k[1]: (c, self._monitors[k][1].profile) for k, c in self.merged.items()
                 if k[0] == public and k[1] in (canary, baseline) and k in self._monitors}
        if len(found) != 2 or not all(c.n for c, _ in found.values()):
            return None
        outputs = found[canary][1].outputs
        if not outputs:
            return None
        return distribution_distance(found[canary][0], found[baseline][0], outputs[0].name)


def bound(bounds: DriftThresholds, feature: str, statistic: str) -> float | None:
    """The bound a feature's statistic is judged by (None: not checked)."""
    if statistic == "chi2_p":
        return bounds.chi2_p
    return bounds.output_js if feature.startswith("output:") else getattr(bounds, statistic, None)


def _past(bounds: DriftThresholds, feature: str, statistic: str, value: float) -> bool:
    """Whether a statistic crossed its bound: p-values alert below, distances above."""
    limit = bound(bounds, feature, statistic)
    return limit is not None and (value < limit if statistic == "chi2_p" else value > limit)


def _publish(path: Path, counts: dict[Key, Counts]) -> None:
    """Write this worker's counts atomically (the leader may read at any time)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps([[list(key), base64.b64encode(c.to_bytes()).decode()] for key, c in counts.items()]))
    os.replace(tmp, path)


def _gather(share: Path) -> list[dict[Key, Counts]]:
    """Other live workers' published counts; files of exited workers are removed."""
    found = []
    for path in share.glob("drift-*.json"):
        try:
            os.kill(int(path.stem.removeprefix("drift-")), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except (ValueError, PermissionError):  # not a worker's file, or a pid reused by another user
            continue
        try:
            found.append({tuple(key): Counts.from_bytes(base64.b64decode(b)) for key, b in orjson.loads(path.read_bytes())})
        except (OSError, ValueError, TypeError) as e:
            log.warning("drift counts in %s unreadable: %s", path, e)
    return found
