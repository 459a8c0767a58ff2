"""Concurrency caps with load shedding: at most `max_in_flight` calls to a target at once;
a call beyond that waits in line up to `max_wait_s`, and one whose remaining deadline (or the
wait bound) cannot cover the expected wait is refused at once with UNAVAILABLE instead of
timing out later. The expected wait is the line ahead of it divided by the cap, times the
target's recent service time."""
from __future__ import annotations

import asyncio
import math
from collections import deque

from gateway.config import CapSpec
from gateway.errors import Unavailable


class Cap:
    def __init__(self, name: str, spec: CapSpec) -> None:
        self.name = name
        self.spec = spec
        self.in_flight = 0
        self.service_s = 0.0          # moving average of recent call durations
        self._line: deque[asyncio.Future[None]] = deque()

    def expected_wait(self) -> float:
        return (len(self._line) + 1) / self.spec.max_in_flight * self.service_s

    async def acquire(self, remaining_s: float | None) -> None:
        """Take a slot, waiting in line if allowed; Unavailable when the wait would not fit."""
        if self.in_flight < self.spec.max_in_flight and not self._line:
            self.in_flight += 1
            return
        budget = min(self.spec.max_wait_s, math.inf if remaining_s is None else remaining_s)
        expected = self.expected_wait()
        if expected > budget:
            raise Unavailable(f"{self.name} is at its concurrency cap ({self.spec.max_in_flight}); "
                              f"expected wait {expected * 1000:.1f} ms exceeds {budget * 1000:.1f} ms")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        try:
            await asyncio.wait_for(turn, budget)
        except TimeoutError:
            raise Unavailable(f"{self.name} is at its concurrency cap ({self.spec.max_in_flight}); "
                              f"waited {budget * 1000:.1f} ms") from None
        finally:
            if not turn.done() or turn.cancelled():
                self._remove(turn)

    def release(self, seconds: float) -> None:
        """A call ended after `seconds`: hand its slot to the next in line, or free it."""
        self.service_s = seconds if self.service_s == 0 else 0.9 * self.service_s + 0.1 * seconds
        while self._line:
            turn = self._line.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on; in_flight stays the same
                return
        self.in_flight -= 1

    def _remove(self, turn: asyncio.Future[None]) -> None:
        try:
            self._line.remove(turn)
        except ValueError:
            pass
