"""The rollout controller: moves a canary through its weight steps while every gate holds, and
rolls it back to 0% with a logged reason when one does not.

A gate is anything with `check(canary, baseline) -> reason | None` over the outcome windows of
the current step: error rate, p99 latency, and — for routes with a drift section naming
`max_distribution_js` — the distance between the canary's and the primary's predictions. A gate
may also `hold(canary, baseline) -> reason | None` the rollout at the last step both targets
still serve (before promotion, or before a step of 100%): the sequential A/B test on a declared
outcome (routes whose `outcomes` name a `test`) lets through only a candidate shown not worse
than the primary by more than its margin, and rolls back one shown worse at any step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from gateway.config import OutcomeTest, Rollout
from gateway.errors import StateUnavailable
from gateway.outcomes.sequential import Arm, Decision, decide
from gateway.routing.state import Change, RolloutStatus, RouteState
from gateway.routing.table import Route, RouteTable, Target
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


@dataclass(frozen=True)
class OutcomeGate:
    """The always-valid sequential test (gateway.outcomes.sequential) between the canary's and the
    primary's outcomes joined to answers of the current step (one traffic split, as the test's
    guarantee assumes): "worse" rolls back; anything but "not_worse" holds the promotion."""

    test: OutcomeTest
    arms: Callable[[str, str], tuple[Arm, Arm] | None]  # (canary, baseline) -> their outcomes so far
    report: Callable[[str, Decision], None] = lambda canary, decision: None

    def _decision(self, canary: Window, baseline: Window) -> Decision | None:
        arms = self.arms(canary.target, baseline.target)
        if arms is None:
            return None
        decision = decide(*arms, margin=self.test.margin, alpha=1 - self.test.confidence,
                          higher_is_better=self.test.higher_is_better, min_n=self.test.min_samples)
        self.report(canary.target, decision)
        return decision

    def check(self, canary: Window, baseline: Window) -> str | None:
        decision = self._decision(canary, baseline)
        return f"{self.test.outcome}: {decision.reason}" if decision is not None and decision.verdict == "worse" else None

    def hold(self, canary: Window, baseline: Window) -> str | None:
        """A reason that changes only with the verdict (the live numbers go to `report`), so a
        held rollout's state is written once, not at every look."""
        decision = self._decision(canary, baseline)
        t = self.test
        if decision is None:
            return f"{t.outcome}: no joined outcomes yet"
        if decision.verdict == "not_worse":
            return None
        return (f"{t.outcome}: not yet shown not worse than the primary by more than {t.margin:g} "
                f"at {t.confidence:.0%} confidence")


Distance = Callable[[str, str, str], float | None]  # (model, canary, baseline) -> JS distance of predictions
ArmsFor = Callable[[Route, str, str], tuple[Arm, Arm] | None]  # (route, canary, baseline) -> outcomes (prefetched)
FetchArms = Callable[[Route, str, str, float], tuple[Arm, Arm] | None]  # (route, canary, baseline, since), blocking


Report = Callable[[str, str, str, Decision], None]  # (model, canary, outcome, decision): each look of an A/B test


def gates_for(route: Route, spec: Rollout, distance: Distance | None, arms: ArmsFor | None = None,
              report: Report | None = None) -> list[Gate]:
    gates: list[Gate] = [ErrorRateGate(spec.max_error_rate_increase), LatencyGate(spec.max_p99_ratio)]
    drift = route.spec.drift
    if drift is not None and drift.max_distribution_js is not None and distance is not None:
        gates.append(DistributionGate(drift.max_distribution_js, lambda a, b: distance(route.public, a, b)))
    outcomes = route.spec.outcomes
    test = outcomes.test if outcomes is not None else None
    if test is not None and arms is not None:
        gates.append(OutcomeGate(test, lambda a, b: arms(route, a, b),
                                 (lambda canary, d: report(route.public, canary, test.outcome, d)) if report
                                 else lambda canary, d: None))
    return gates


class RolloutController:
    """Evaluates every route with a rollout on a timer, while `leads()` says this process decides
    (worker 0; with replicas, the holder of the Redis lease); a change of one route's rollout goes
    through `update(model, change)`, which persists it (fenced by the lease) and rebuilds the
    route table. The other processes apply the decision from the shared state."""

    def __init__(self, table: Callable[[], RouteTable], states: Callable[[], dict[str, RouteState]],
                 update: Callable[[str, Change], Awaitable[None]], interval_s: float = 1.0,
                 on_event: Callable[[str, str, str], None] = lambda model, target, event: None,
                 distance: Distance | None = None, outcomes: FetchArms | None = None,
                 on_test: Report | None = None,
                 leads: Callable[[], bool] = lambda: True) -> None:
        """on_event(model, canary, event): started, advanced, held, promoted or rolled_back; distance:
        how far apart two targets' predictions are (the drift hub), for the distribution gate;
        outcomes: the joined outcomes of two targets since a time (the join store, read in a
        thread before each tick), for the A/B gate, whose every look goes to on_test."""
        self._distance = distance
        self._fetch = outcomes
        self._on_test = on_test
        self._table = table
        self._states = states
        self._update = update
        self.interval_s = interval_s
        self._on_event = on_event
        self.leads = leads  # whether this process decides now (the retrain signal asks the same)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.leads():
                continue
            try:
                await self.tick()
            except LostLease as e:
                log.warning("rollout decision not written: %s; the new leader decides", e)
            except StateUnavailable:
                pass  # counted and logged by the update; the next tick decides again
            except Exception:  # noqa: BLE001 - the controller must keep running
                log.exception("rollout tick failed")

    async def _arms(self) -> dict[tuple[str, str, str], tuple[Arm, Arm]]:
        """The A/B evidence of every progressing rollout with an outcome test, read off the loop."""
        fetch = self._fetch
        if fetch is None:
            return {}
        wanted = []
        for route in list(self._table().routes.values()):
            spec, outcomes = route.spec.rollout, route.spec.outcomes
            state = self._states().get(route.public)
            if spec and outcomes and outcomes.test and state and state.rollout and state.rollout.phase == "progressing":
                wanted.append((route, spec.target, _primary(route, spec).name, state.rollout.since))
        found = await asyncio.gather(*(asyncio.to_thread(fetch, *w) for w in wanted), return_exceptions=True)
        evidence = {}
        for w, arms in zip(wanted, found):
            if isinstance(arms, Exception):  # the store is down: no evidence, so no A/B verdict; other gates go on
                log.warning("rollout %s: the A/B test's outcomes cannot be read: %s", w[0].public, arms)
            elif arms is not None:
                evidence[(w[0].public, w[1], w[2])] = arms
        return evidence

    async def tick(self) -> None:
        """One look at every rollout, with the A/B evidence of those that test outcomes."""
        evidence = await self._arms()
        fetched: ArmsFor | None = (lambda route, a, b: evidence.get((route.public, a, b))) if self._fetch else None
        for route in list(self._table().routes.values()):
            if route.spec.rollout is None:
                continue
            state = self._states().get(route.public) or RouteState()
            status = self._next(route, route.spec.rollout, state, fetched)
            if status is not None:
                event = "started" if state.rollout is None else \
                    status.phase if status.phase in ("promoted", "rolled_back") else \
                    "held" if status.step == state.rollout.step else "advanced"   # before the update changes state
                await self._update(route.public, lambda state, status=status: _with_rollout(state, status))
                self._on_event(route.public, route.spec.rollout.target, event)

    def _next(self, route: Route, spec: Rollout, state: RouteState, arms: ArmsFor | None) -> RolloutStatus | None:
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
        primary = _primary(route, spec)
        baseline = Window(primary.name, *primary.stats.window(since))
        if canary.requests < spec.min_requests:
            return None
        gates = gates_for(route, spec, self._distance, arms, self._on_test)
        for gate in gates:
            reason = gate.check(canary, baseline)
            if reason:
                log.warning("rollout %s: %s rolled back to 0%% at step %d%%: %s",
                            route.public, spec.target, spec.steps[status.step], reason)
                return RolloutStatus(status.step, now_wall, "rolled_back", reason)
        if now_wall - status.since < spec.dwell_s:
            return None
        last = status.step + 1 == len(spec.steps)
        if spec.steps[status.step] < 100 and (last or spec.steps[status.step + 1] >= 100):
            # the last step both arms still serve: the A/B test must pass before the canary takes all
            for gate in gates:
                held = gate.hold(canary, baseline) if isinstance(gate, OutcomeGate) else None
                if held:
                    if held == status.reason:
                        return None
                    log.info("rollout %s: %s holds at %d%%: %s", route.public, spec.target, spec.steps[status.step], held)
                    return RolloutStatus(status.step, status.since, "progressing", held)
        if not last:
            log.info("rollout %s: %s advances to %d%%", route.public, spec.target, spec.steps[status.step + 1])
            return RolloutStatus(status.step + 1, now_wall)
        log.info("rollout %s: %s promoted to 100%%", route.public, spec.target)
        return RolloutStatus(status.step, now_wall, "promoted", "all steps passed")


def _primary(route: Route, spec: Rollout) -> Target:
    """The target the canary is compared with: the heaviest of the others."""
    return max((t for name, t in route.targets.items() if name != spec.target), key=lambda t: t.weight)


def _with_rollout(state: RouteState, status: RolloutStatus) -> RouteState:
    state.rollout = status
    return state
