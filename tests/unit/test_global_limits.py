"""Global rate limits against a real Redis (scripts/redis.sh): the shared bucket's script, two
processes' leases staying within the documented bound while calling Redis far less than once
per request, Redis stopped mid-way (fail_open and fail_closed) and started again, and a hung
Redis costing at most one request one timeout."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from gateway.config import RateLimit, RedisSpec
from gateway.errors import ResourceExhausted, Unavailable
from gateway.resilience.leases import SharedBuckets
from gateway.resilience.limits import Limits
from gateway.shared.link import RedisLink


class Process:
    """One gateway process's side: its own link, leases and local buckets, and what it counted."""

    def __init__(self, url: str, global_limit: dict | None = None, model_limit: dict | None = None) -> None:
        self.errors: Counter = Counter()
        self.degraded: Counter = Counter()
        self.link = RedisLink(RedisSpec(url=url, timeout_s=0.2, retry_s=0.3), lambda use: self.errors.update([use]))
        shared = SharedBuckets(self.link, lambda scope, decision: self.degraded.update([(scope, decision)]))
        self.limits = Limits(RateLimit(**global_limit) if global_limit else None, None, shared)
        self.model = self.limits.model("m", RateLimit(**model_limit) if model_limit else None)

    async def admit(self) -> str:
        """The outcome of one request: OK, RESOURCE_EXHAUSTED or UNAVAILABLE."""
        try:
            await self.limits.admit("c", "m", self.model)
            return "OK"
        except (ResourceExhausted, Unavailable) as e:
            return e.code.name


def calls(server) -> int:
    """Scripts Redis has run so far (EVALSHA, and EVAL when the script was not loaded yet)."""
    stats = redis.Redis.from_url(server.url).info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))


async def test_the_shared_bucket_refills_by_redis_time_and_grants_what_it_holds(redis_server):
    link = RedisLink(RedisSpec(url=redis_server.url))
    take = SharedBuckets(link).script
    key = ["t:bucket"]
    assert await take(keys=key, args=[10, 5, 3]) == [3, 0]  # 2 left: half of 3 rounded up, no wait
    granted, wait_ms = await take(keys=key, args=[10, 5, 3])
    assert granted == 2 and 190 <= wait_ms <= 200        # empty: two tokens at 10/s take 200 ms
    granted, wait_ms = await take(keys=key, args=[10, 5, 4])
    assert granted == 0 and 150 <= wait_ms <= 200
    assert 1000 < await link.client.pttl(key[0]) <= 1500  # kept until it would be full again, plus a second
    await asyncio.sleep(0.35)
    assert (await take(keys=key, args=[10, 5, 5]))[0] == 3  # 0.35 s at 10/s
    await asyncio.sleep(1.0)
    assert (await take(keys=key, args=[10, 5, 50]))[0] == 5  # never more than burst
    await link.close()


async def test_two_processes_stay_within_the_bound_and_rarely_call_redis(redis_server):
    rate, burst, lease = 400, 40, 20
    spec = {"rate": rate, "burst": burst, "scope": "global", "lease": lease}
    processes = [Process(redis_server.url, global_limit=spec) for _ in range(2)]
    before = calls(redis_server)
    seconds = 1.5

    async def offer(p: Process) -> Counter:   # as fast as 1 ms pauses let (600-1000/s): over both limits
        outcomes: Counter = Counter()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            outcomes[await p.admit()] += 1
            await asyncio.sleep(0.001)
        return outcomes

    start = time.monotonic()
    results = await asyncio.gather(*(offer(p) for p in processes))
    elapsed = time.monotonic() - start
    admitted = sum(r["OK"] for r in results)
    exact = burst + rate * elapsed                     # what one exact bucket admits
    print(f"\nadmitted {[r['OK'] for r in results]} of {[sum(r.values()) for r in results]} in {elapsed:.2f}s; "
          f"one exact bucket: {exact:.0f}; Redis calls: {calls(redis_server) - before}")
    assert admitted <= exact + 2 * lease                # the bound: processes x lease
    assert admitted >= exact - 2 * lease - lease        # stranded leases, half a lease refilling at the end
    assert all(r["OK"] > 0.2 * admitted for r in results)  # neither process is starved (the jittered wait)
    assert calls(redis_server) - before <= admitted / 4  # leases: far fewer Redis calls than requests
    assert not any(p.errors or p.degraded for p in processes)
    for p in processes:
        await p.link.close()


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_redis_stopped_applies_the_policy_and_returning_redis_is_used_again(redis_server, policy):
    spec = {"rate": 20, "burst": 10, "scope": "global", "lease": 4, "on_redis_down": policy}
    p = Process(redis_server.url, model_limit=spec)
    assert await p.admit() == "OK"
    assert p.model.shared.balance == 3                 # a lease of 4, one spent
    redis_server.stop()
    outcomes = Counter()
    slowest = 0.0
    for _ in range(15):                                # back to back: the local bucket cannot refill meanwhile
        start = time.monotonic()
        outcomes[await p.admit()] += 1
        slowest = max(slowest, time.monotonic() - start)
    assert not p.link.up and p.errors["limits"] >= 1
    if policy == "fail_open":                          # the 3 leased tokens, then the local bucket alone (burst 10)
        assert 9 <= outcomes["OK"] <= 11 and outcomes["RESOURCE_EXHAUSTED"] == 15 - outcomes["OK"], outcomes
        assert p.degraded[("model", "admitted")] == outcomes["OK"] - 3 and not p.degraded[("model", "refused")]
    else:                                              # the 3 leased tokens, then UNAVAILABLE
        assert outcomes == {"OK": 3, "UNAVAILABLE": 12}, outcomes
        assert p.degraded[("model", "refused")] == 12 and not p.degraded[("model", "admitted")]
    assert slowest < 0.25                              # nobody waits longer than one timeout_s on a dead Redis
    errors = p.errors["limits"]
    for _ in range(5):
        await p.admit()
    assert p.errors["limits"] == errors, "while down, requests do not try Redis"

    redis_server.start()                               # empty: no bucket, no script loaded
    await asyncio.sleep(0.3 + 0.3)                     # retry_s, and a margin
    assert p.link.up
    await asyncio.sleep(0.5)                           # the local bucket refills (20/s)
    degraded = sum(p.degraded.values())
    assert await p.admit() == "OK"
    assert sum(p.degraded.values()) == degraded        # decided by the shared bucket again
    keys = await p.link.client.keys("infergate:limit:*")
    assert keys == [b"infergate:limit:model:20/10:m"]
    await p.link.close()


async def test_a_hung_redis_costs_one_timeout_then_nobody_waits(redis_server):
    p = Process(redis_server.url, global_limit={"rate": 1000, "burst": 100, "scope": "global", "lease": 2})
    assert await p.admit() == "OK"
    pid = int((Path(redis_server.env["REDIS_HOME"]) / f"redis-{redis_server.port}.pid").read_text())
    os.kill(pid, signal.SIGSTOP)                       # accepts connections, answers nothing
    try:
        waits = []
        for _ in range(20):
            start = time.monotonic()
            assert await p.admit() == "OK"             # fail_open: the local bucket decides
            waits.append(time.monotonic() - start)
        assert not p.link.up and p.errors["limits"] == 1
        assert max(waits) < 0.2 + 0.1                  # at most one request waited out timeout_s...
        assert sorted(waits)[-2] < 0.01                # ...and no other one waited at all
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.sleep(0.3 + 0.3)
    assert p.link.up
    await p.link.close()
