"""The circuit breaker around a target: which errors count, open, half-open trials, closing."""
from __future__ import annotations

import time

import grpc
import pytest

from gateway.config import BreakerSpec
from gateway.errors import BackendError, GatewayError, Unavailable
from gateway.resilience.breaker import Breaker

DOWN = Unavailable("connection refused")
BAD_INPUT = BackendError("unexpected shape", grpc.StatusCode.INVALID_ARGUMENT)


def breaker(**spec) -> tuple[Breaker, list[str]]:
    changes: list[str] = []
    return Breaker("m/t", BreakerSpec(**spec), lambda name, state: changes.append(state)), changes


def fail(b: Breaker, error: GatewayError, n: int = 1) -> None:
    for _ in range(n):
        b.record(error, b.admit())


def test_opens_after_consecutive_counted_failures_only():
    b, changes = breaker(failures=3, open_s=60)
    fail(b, DOWN, 2)
    b.record(None, b.admit())          # a success resets the count
    fail(b, DOWN, 2)
    fail(b, BAD_INPUT, 5)              # the backend answered: not a failure
    assert b.state == "closed"
    fail(b, DOWN, 3)
    assert b.state == "open" and changes == ["open"]
    with pytest.raises(Unavailable, match="circuit breaker for m/t is open"):
        b.admit()


def test_half_open_allows_limited_trials_then_closes_or_reopens():
    b, changes = breaker(failures=1, open_s=0.05, half_open_probes=1)
    fail(b, DOWN)
    time.sleep(0.06)
    trial = b.admit()
    assert trial and b.state == "half-open"
    with pytest.raises(Unavailable, match="half-open"):
        b.admit()                      # one trial at a time
    b.record(DOWN, trial)
    assert b.state == "open"
    time.sleep(0.06)
    b.record(None, b.admit())
    assert b.state == "closed" and changes[-1] == "closed"


def test_a_cancelled_trial_frees_its_slot():
    b, _ = breaker(failures=1, open_s=0.01)
    fail(b, DOWN)
    time.sleep(0.02)
    b.release(b.admit())
    assert b.admit()


def test_failure_ratio_over_a_window_opens_it():
    b, changes = breaker(failures=1000, failure_ratio=0.5, window_s=60, min_calls=10, open_s=60)
    for i in range(9):  # 5 of 9 failed, but fewer than min_calls
        b.record(DOWN if i % 2 == 0 else None, b.admit())
    assert b.state == "closed"
    b.record(None, b.admit())  # 5 of 10: the ratio is reached
    assert b.state == "open" and changes == ["open"]
