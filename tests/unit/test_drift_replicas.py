"""Drift counts merged across replicas through a real Redis: every replica judges the exact sum,
equal to one process's counts of all the traffic; a silent replica is forgotten; a replica on
another profile is skipped; with Redis down a replica judges its own counts."""
from __future__ import annotations

import asyncio

import numpy as np

from gateway.config import RedisSpec
from gateway.drift.profile import build_profile
from gateway.drift.replicas import ReplicaMerge
from gateway.drift.state import Binner, Counts
from gateway.drift.stats import compare
from gateway.shared.link import RedisLink

KEY = ("classifier", "v1", "1")
RNG = np.random.default_rng(3)
PROFILE = build_profile("classifier", "1", {"x": RNG.normal(size=(500, 4))}, {"p": RNG.dirichlet(np.ones(3), 500)}, {})


def counts(x: np.ndarray, p: np.ndarray) -> Counts:
    """What one process counts for these requests (one request per row)."""
    binner = Binner(PROFILE)
    c = binner.zeros()
    for row, probs in zip(x, p):
        binner.observe(c, {"x": row[None]}, {"p": probs[None]})
        c.n += 1
    return c


def replica(url: str) -> ReplicaMerge:
    return ReplicaMerge(RedisLink(RedisSpec(url=url, timeout_s=0.2, retry_s=0.2)))


async def test_every_replica_judges_the_sum_of_all_and_forgets_a_silent_one(redis_server):
    x, p = RNG.normal(0.3, 1, size=(300, 4)), RNG.dirichlet(np.ones(3), 300)
    mine, theirs = counts(x[:120], p[:120]), counts(x[120:], p[120:])
    a, b = replica(redis_server.url), replica(redis_server.url)
    await a.merge({KEY: mine}, 0.1)                   # a first: b is not there yet
    seen_by_b = (await b.merge({KEY: theirs}, 0.1))[KEY]
    seen_by_a = (await a.merge({KEY: mine}, 0.1))[KEY]
    single = counts(x, p)                             # one process that saw all 300 requests
    for merged in (seen_by_a, seen_by_b):
        assert merged.n == 300 and np.array_equal(merged.data, single.data)
        assert compare(PROFILE, merged) == compare(PROFILE, single)
    assert mine.n == 120 and theirs.n == 180, "merging does not change a replica's own counts"
    await asyncio.sleep(3 * 0.1 + 0.2 + 0.05)         # b silent for three ticks (plus timeout_s)
    assert (await a.merge({KEY: mine}, 0.1))[KEY].n == 120
    assert await a.link.client.hlen(a.keys(KEY)[0]) == 1
    for r in (a, b):
        await r.link.close()


async def test_a_replica_on_another_profile_is_skipped(redis_server):
    other = build_profile("classifier", "1", {"x": RNG.normal(size=(500, 5))}, None, {})
    a, b = replica(redis_server.url), replica(redis_server.url)
    odd = Binner(other).zeros()
    odd.n = 7
    await b.merge({KEY: odd}, 1.0)
    mine = counts(RNG.normal(size=(10, 4)), RNG.dirichlet(np.ones(3), 10))
    assert (await a.merge({KEY: mine}, 1.0))[KEY].n == 10
    for r in (a, b):
        await r.link.close()


async def test_with_redis_down_a_replica_judges_its_own_counts(redis_server):
    errors = []
    a = ReplicaMerge(RedisLink(RedisSpec(url=redis_server.url, timeout_s=0.2, retry_s=0.2), errors.append))
    mine = counts(RNG.normal(size=(10, 4)), RNG.dirichlet(np.ones(3), 10))
    redis_server.stop()
    assert (await a.merge({KEY: mine}, 1.0))[KEY] is mine and errors == ["drift"] and not a.link.up
    assert (await a.merge({KEY: mine}, 1.0))[KEY] is mine and errors == ["drift"], "no call while down"
    redis_server.start()
    await asyncio.sleep(0.5)
    assert a.link.up and (await a.merge({KEY: mine}, 1.0))[KEY].n == 10
    await a.link.close()
