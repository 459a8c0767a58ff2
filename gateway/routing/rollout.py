"""The rollout controller: moves a canary through its weight steps while every gate holds, and
rolls it back to 0% with a logged reason when one does not.

A gate is anything with `check(canary, baseline) -> reason | None` over the outcome windows of
the current step: error rate, p99 latency, and — for routes with a drift section naming
`max_distribution_js` — the distance between the canary's and the primary's predictions.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from gateway.config import Rollout
from gateway.errors import StateUnavailable
from gateway.routing.state import Change, RolloutStatus, RouteState
from gateway.routing.table import Route, RouteTable
from gateway.shared.lease import LostLease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """A target's outcomes during the current step."""

    target: str
    requests: int
    error_rate: float
    p99_s: float


class Gate(Protocol):
    def check(self, canary: Window, baseline: Window) -> str | None:
        """A reason to roll back, or None when the canary is within bounds."""


@dataclass(frozen=True)
class ErrorRateGate:
    max_increase: float

    def check(self, canary: Window, baseline: Window) -> str | None:
        if canary.error_rate - baseline.error_rate > self.max_increase:
            return (f"error rate {canary.error_rate:.1%} vs {baseline.error_rate:.1%} on the primary "
                    f"(allowed increase {self.max_increase:.1%})")
        return None


@dataclass(frozen=True)
class LatencyGate:
    max_ratio: float

    def check(self, canary: Window, baseline: Window) -> str | None:
        if baseline.p99_s > 0 and canary.p99_s > self.max_ratio * baseline.p99_s:
            return (f"p99 latency {canary.p99_s * 1000:.1f} ms vs {baseline.p99_s * 1000:.1f} ms on the primary "
                    f"(allowed ratio {self.max_ratio:g})")
        return None


@dataclass(frozen=True)
class DistributionGate:
    """The canary's argmax distribution (its recent drift window, all workers merged) must stay
    within `max_js` Jensen-Shannon distance of the primary's."""

    max_js: float
    distance: Callable[[str, str], float | None]  # (canary, baseline) target names -> distance

    def check(self, canary: Window, baseline: Window) -> str | None:
        js = self.distance(canary.target, baseline.target)
        if js is not None and js > self.max_js:
            return f"prediction distribution departs from the primary's: Jensen-Shannon distance {js:.3f} > {self.max_js:g}"
        return None


Distance = Callable[[str, str, str], float | None]  # (model, canary, baseline) -> JS distance of predictions


def gates_for(route: Route, spec: Rollout, distance: Distance | None) -> list[Gate]:
    gates: list[Gate] = [ErrorRateGate(spec.max_error_rate_increase), LatencyGate(spec.max_p99_ratio)]
    drift = route.spec.drift
    if drift is not None and drift.max_distribution_js is not None and distance is not None:
        gates.append(DistributionGate(drift.max_distribution_js, lambda a, b: distance(route.public, a, b)))
    return gates


class RolloutController:
    """Evaluates every route with a rollout on a timer, while `leads()` says this process decides
    (worker 0; with replicas, the holder of the Redis lease); a change of one route's rollout goes
    through `update(model, change)`, which persists it (fenced by the lease) and rebuilds the
    route table. The other processes apply the decision from the shared state."""

    def __init__(self, table: Callable[[], RouteTable], states: Callable[[], dict[str, RouteState]],
                 update: Callable[[str, Change], Awaitable[None]], interval_s: float = 1.0,
                 on_event: Callable[[str, str, str], None] = lambda model, target, event: None,
                 distance: Distance | None = None, leads: Callable[[], bool] = lambda: True) -> None:
        """on_event(model, canary, event): started, advanced, promoted or rolled_back; distance:
        how far apart two targets' predictions are (the drift hub), for the distribution gate."""
        self._distance = distance
        self._table = table
        self._states = states
        self._update = update
        self.interval_s = interval_s
        self._on_event = on_event
        self._leads = leads

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not self._leads():
                continue
            try:
                await self.tick()
            except LostLease as e:
                log.warning("rollout decision not written: %s; the new leader decides", e)
            except StateUnavailable:
                pass  # counted and logged by the update; the next tick decides again
            except Exception:  # noqa: BLE001 - the controller must keep running
                log.exception("rollout tick failed")

    async def tick(self) -> None:
        for route in list(self._table().routes.values()):
            if route.spec.rollout is None:
                continue
            state = self._states().get(route.public) or RouteState()
            status = self._next(route, route.spec.rollout, state)
            if status is not None:
                await self._update(route.public, lambda state, status=status: _with_rollout(state, status))
                event = "started" if state.rollout is None else \
                    status.phase if status.phase in ("promoted", "rolled_back") else "advanced"
                self._on_event(route.public, route.spec.rollout.target, event)

    def _next(self, route: Route, spec: Rollout, state: RouteState) -> RolloutStatus | None:
        """The rollout's next status, or None when it stays as it is."""
        if state.rollout is None:
            log.info("rollout %s: %s starts at %d%%", route.public, spec.target, spec.steps[0])
            return RolloutStatus()
        status = state.rollout
        if status.phase != "progressing" or state.weights_override is not None or state.active is not None:
            return None
        now_wall, now_mono = time.time(), time.monotonic()
        since = now_mono - (now_wall - status.since)
        canary = Window(spec.target, *route.targets[spec.target].stats.window(since))
        others = [t for name, t in route.targets.items() if name != spec.target]
        primary = max(others, key=lambda t: t.weight)
        baseline = Window(primary.name, *primary.stats.window(since))
        if canary.requests < spec.min_requests:
            return None
        for gate in gates_for(route, spec, self._distance):
            reason = gate.check(canary, baseline)
            if reason:
                log.warning("rollout %s: %s rolled back to 0%% at step %d%%: %s",
                            route.public, spec.target, spec.steps[status.step], reason)
                return RolloutStatus(status.step, now_wall, "rolled_back", reason)
        if now_wall - status.since < spec.dwell_s:
            return None
        if status.step + 1 < len(spec.steps):
            log.info("rollout %s: %s advances to %d%%", route.public, spec.target, spec.steps[status.step + 1])
            return RolloutStatus(status.step + 1, now_wall)
        log.info("rollout %s: %s promoted to 100%%", route.public, spec.target)
        return RolloutStatus(status.step, now_wall, "promoted", "all steps passed")


def _with_rollout(state: RouteState, status: RolloutStatus) -> RouteState:
    state.rollout = status
    return state
