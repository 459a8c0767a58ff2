"""Circuit breakers per route target, on pybreaker's state machine (closed, open, half-open),
used correctly from asyncio: pybreaker guards synchronous calls, so the decision to send and
the recording of the outcome are two short synchronous steps around the awaited backend call,
and no lock is ever held across an await.

Which failures count is explicit: UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL and UNKNOWN from the
backend; anything else (INVALID_ARGUMENT, NOT_FOUND, ...) means the backend answered.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import grpc
import pybreaker

from gateway.config import BreakerSpec, CapSpec
from gateway.errors import GatewayError, Unavailable
from gateway.resilience.caps import Cap

COUNTED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                     grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
STATE_VALUES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


class _Counted(Exception):
    """Carries a counted backend failure into pybreaker."""


def _succeed() -> None:
    return None


def _fail(error: GatewayError) -> None:
    raise _Counted(error.message)


class Breaker:
    """One target's breaker. `admit()` before the call (raises Unavailable while open, and
    beyond `half_open_probes` concurrent trial calls); `record()` after it."""

    def __init__(self, name: str, spec: BreakerSpec, on_change: Callable[[str, str], None]) -> None:
        self.name = name
        self.spec = spec
        self._probes = 0
        self._opened_at = 0.0
        self._recent: deque[tuple[float, bool]] = deque()  # (time, failed) within window_s, ratio mode

        def changed(state: str) -> None:
            if state == pybreaker.STATE_OPEN:
                self._opened_at = time.monotonic()
            on_change(name, state)

        listener = _Listener(changed)
        self._cb = pybreaker.CircuitBreaker(fail_max=spec.failures, reset_timeout=spec.open_s,
                                            success_threshold=spec.half_open_probes, listeners=[listener],
                                            name=name, throw_new_error_on_trip=False)

    @property
    def state(self) -> str:
        return self._cb.current_state

    def admit(self) -> bool:
        """May a call go to the backend now? Returns whether it is a half-open trial call."""
        state = self._cb.current_state
        if state == pybreaker.STATE_OPEN:
            if time.monotonic() - self._opened_at < self.spec.open_s:
                raise Unavailable(f"circuit breaker for {self.name} is open")
            self._cb.half_open()
            state = pybreaker.STATE_HALF_OPEN
        if state == pybreaker.STATE_HALF_OPEN:
            if self._probes >= self.spec.half_open_probes:
                raise Unavailable(f"circuit breaker for {self.name} is half-open and its trial calls are in flight")
            self._probes += 1
            return True
        return False

    def release(self, trial: bool) -> None:
        """An admitted call ended without an outcome (the caller went away)."""
        if trial:
            self._probes -= 1

    def record(self, error: GatewayError | None, trial: bool) -> None:
        """The outcome of an admitted call."""
        self.release(trial)
        failed = error is not None and error.code in COUNTED
        try:
            if failed:
                self._cb.call(_fail, error)
            else:
                self._cb.call(_succeed)
        except (_Counted, pybreaker.CircuitBreakerError):
            pass
        if self.spec.failure_ratio is not None and not trial:
            self._judge_ratio(failed)

    def _judge_ratio(self, failed: bool) -> None:
        now = time.monotonic()
        self._recent.append((now, failed))
        while self._recent and self._recent[0][0] < now - self.spec.window_s:
            self._recent.popleft()
        calls = len(self._recent)
        if self._cb.current_state == pybreaker.STATE_CLOSED and calls >= self.spec.min_calls:
            assert self.spec.failure_ratio is not None
            if sum(f for _, f in self._recent) / calls >= self.spec.failure_ratio:
                self._recent.clear()
                self._cb.open()


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, changed: Callable[[str], None]) -> None:
        self._changed = changed

    def state_change(self, cb: pybreaker.CircuitBreaker, old: object, new: pybreaker.CircuitBreakerState) -> None:
        self._changed(new.name)


class PerTarget:
    """Breakers and caps of all route targets, kept across reloads while a target's spec is
    unchanged (a reload must not forget an open breaker or the calls in flight)."""

    def __init__(self, on_breaker_change: Callable[[str, str, str], None] = lambda model, target, state: None) -> None:
        self._on_change = on_breaker_change
        self._made: dict[tuple[str, str, str], Any] = {}

    def breaker(self, model: str, target: str, spec: BreakerSpec | None) -> Breaker | None:
        return self._get("breaker", model, target, spec,
                         lambda: Breaker(f"{model}/{target}", spec, lambda name, state: self._on_change(model, target, state)))

    def cap(self, model: str, target: str, spec: CapSpec | None) -> Cap | None:
        return self._get("cap", model, target, spec, lambda: Cap(f"{model}/{target}", spec))

    def _get(self, kind: str, model: str, target: str, spec: Any, make: Callable[[], Any]) -> Any:
        if spec is None:
            return None
        found = self._made.get((kind, model, target))
        if found is None or found.spec != spec:
            found = self._made[(kind, model, target)] = make()
            if kind == "breaker":
                self._on_change(model, target, found.state)
        return found
