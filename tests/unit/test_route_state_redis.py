"""The rollout leader lease and the route state store in Redis, against a real Redis server
(redis_server: scripts/redis.sh on a free port): acquire, renew, expiry, takeover after expiry,
fencing of a stale leader's write, atomic updates from many writers, change notices, a Redis that
lost its data, and Redis down."""
from __future__ import annotations

import threading
import time

import pytest

from gateway import config
from gateway.errors import StateUnavailable
from gateway.routing.state import RolloutStatus, RouteState
from gateway.shared.connection import connect
from gateway.shared.lease import Lease, LostLease
from gateway.shared.route_state import RedisRouteState

TTL_S = 0.3


@pytest.fixture
def client(redis_server):
    return connect(config.RedisSpec(url=redis_server.url, timeout_s=0.5))


def store(client) -> RedisRouteState:
    return RedisRouteState(client, "t:", poll_s=0.5)


def pin(target: str):
    def change(state: RouteState) -> RouteState:
        state.active = target
        return state
    return change


def test_the_first_replica_takes_the_lease_and_only_it_renews_or_releases(client):
    first, second = Lease(client, "t:leader", TTL_S), Lease(client, "t:leader", TTL_S)
    assert first.hold() and first.held and first.holder() == first.token
    assert not second.hold() and not second.held
    assert not second.renew() and not second.release(), "the lease is not second's to renew or release"
    assert client.get("t:leader") == first.token
    time.sleep(TTL_S * 0.6)
    assert first.renew() and client.pttl("t:leader") > TTL_S * 1000 * 0.8, "renewal restarts the TTL"
    time.sleep(TTL_S * 0.6)
    assert first.held and client.get("t:leader") == first.token, "renewed: still held past the first TTL"
    assert first.release() and not first.held and client.get("t:leader") is None
    assert second.hold() and second.held, "a released lease is free at once"


def test_an_unrenewed_lease_expires_and_another_takes_it(client):
    old, new = Lease(client, "t:leader", TTL_S), Lease(client, "t:leader", TTL_S)
    assert old.acquire()
    time.sleep(TTL_S + 0.1)
    assert not old.held, "by its own clock the old holder knows its lease ran out"
    assert old.holder() is None, "and Redis expired the key"
    assert new.hold() and new.holder() == new.token
    assert not old.renew() and not old.held, "the old holder cannot take it back by renewing"
    assert not old.hold()


def test_a_stale_leaders_write_is_fenced(client):
    states = store(client)
    old, new = Lease(client, "t:leader", TTL_S), Lease(client, "t:leader", TTL_S)
    assert old.acquire()
    states.update("m", pin("a"), fence=old)
    assert states.load()["m"].active == "a"
    time.sleep(TTL_S + 0.1)
    assert new.acquire()
    version = states.version()
    with pytest.raises(LostLease):
        states.update("m", pin("b"), fence=old)   # e.g. it paused past its TTL and woke up
    assert states.load()["m"].active == "a" and states.version() == version, "nothing was written"
    states.update("m", pin("c"), fence=new)
    assert states.load()["m"].active == "c"


def test_concurrent_updates_from_many_writers_lose_nothing(client, redis_server):
    """Eight writers (as eight replicas: a store each), twenty changes each, all to one route."""
    def add(key: str):
        def change(state: RouteState) -> RouteState:
            state.versions = {**(state.versions or {}), key: "1"}
            return state
        return change

    def writer(w: int) -> None:
        mine = store(connect(config.RedisSpec(url=redis_server.url)))
        for i in range(20):
            mine.update("m", add(f"{w}-{i}"))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store(client).load()["m"].versions) == 160
    assert store(client).version() == "160", "one version per write"


def test_a_write_notifies_other_replicas_at_once(client):
    reader, writer = store(client), store(client)
    reader.wait()   # subscribes (the subscription's own confirmation returns at once)
    before = reader.version()
    threading.Timer(0.1, lambda: writer.update("m", pin("b"))).start()
    start = time.monotonic()
    reader.wait()
    assert time.monotonic() - start < 0.4, "the notice arrived well before the poll interval"
    assert reader.version() != before and reader.load()["m"].active == "b"
    start = time.monotonic()
    reader.wait()
    assert time.monotonic() - start >= 0.45, "without a change, wait() lasts poll_s"


def test_states_round_trip_and_empty_ones_are_dropped(client):
    states = store(client)
    rollout = RolloutStatus(step=1, since=123.5, phase="rolled_back", reason="error rate")
    states.replace({"m": RouteState(weights_override={"a": 100}, rollout=rollout, spec_hash="h"), "n": RouteState()})
    assert states.load() == {"m": RouteState(weights_override={"a": 100}, rollout=rollout, spec_hash="h")}
    states.update("m", lambda state: RouteState())
    assert states.load() == {} and client.hgetall("t:route-state") == {}


def test_a_redis_that_lost_its_data_gets_the_last_known_states_back(client):
    states = store(client)
    states.update("m", pin("b"))
    client.flushdb()   # a restart without persistence
    assert states.version() is None
    assert states.load()["m"].active == "b"
    assert store(client).load()["m"].active == "b", "put back for every replica"
    states.update("n", pin("c"))
    assert set(store(client).load()) == {"m", "n"}


def test_redis_down_is_state_unavailable_and_recovers(client, redis_server):
    states, lease = store(client), Lease(client, "t:leader", TTL_S)
    states.update("m", pin("b"))
    redis_server.stop()
    for call in (states.load, states.version, lambda: states.update("m", pin("c"))):
        start = time.monotonic()
        with pytest.raises(StateUnavailable, match="unreachable"):
            call()
        assert time.monotonic() - start < 1.0, "no retries with backoff while Redis is down"
    start = time.monotonic()
    states.wait()
    assert 0.45 <= time.monotonic() - start < 1.0, "a broken subscription waits poll_s, not a busy loop"
    redis_server.start()
    assert states.load()["m"].active == "b" and lease.hold()
