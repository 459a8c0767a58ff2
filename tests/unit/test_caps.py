"""Concurrency caps: slots, a bounded line, and shedding by expected wait."""
from __future__ import annotations

import asyncio

import pytest

from gateway.config import CapSpec
from gateway.errors import Unavailable
from gateway.resilience.caps import Cap


async def test_slots_pass_to_the_line_in_order():
    cap = Cap("m/t", CapSpec(max_in_flight=1, max_wait_s=1.0))
    await cap.acquire(None)
    got: list[int] = []

    async def wait(i: int) -> None:
        await cap.acquire(None)
        got.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert got == [] and cap.in_flight == 1
    cap.release(0.001)
    await asyncio.sleep(0.01)
    assert got == [0]
    cap.release(0.001)
    await asyncio.gather(*waiters)
    assert got == [0, 1] and cap.in_flight == 1
    cap.release(0.001)
    assert cap.in_flight == 0


async def test_sheds_when_the_expected_wait_does_not_fit_the_deadline():
    cap = Cap("m/t", CapSpec(max_in_flight=2, max_wait_s=1.0))
    for _ in range(2):
        await cap.acquire(None)
    cap.release(0.2)          # service time about 200 ms
    await cap.acquire(None)
    with pytest.raises(Unavailable, match="expected wait 100.0 ms exceeds 50.0 ms"):
        await cap.acquire(0.05)   # the caller's deadline is 50 ms away: refused at once


async def test_a_wait_longer_than_max_wait_is_refused():
    cap = Cap("m/t", CapSpec(max_in_flight=1, max_wait_s=0.02))
    await cap.acquire(None)
    with pytest.raises(Unavailable, match="waited 20.0 ms"):
        await cap.acquire(None)
    cap.release(0.001)
    assert cap.in_flight == 0
