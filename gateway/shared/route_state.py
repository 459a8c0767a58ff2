"""Route states in Redis, shared by every replica: one hash (model -> JSON, the state file's
form), a version counter every write bumps, and a pub/sub notice per write. Replicas reload on the
notice at once and compare the version every poll_s in case a notice was lost (a subscriber
reconnecting). Every write is a WATCH/MULTI transaction, so replicas changing routes at once never
lose each other's changes, and a leader's write is fenced by its lease.

A Redis that lost its data (restarted without persistence) gets the last known states back from
the first replica that reads or writes after it returns."""
from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Iterator

import redis
from redis.client import Pipeline, PubSub

from gateway.config import GatewayConfig
from gateway.errors import StateUnavailable
from gateway.routing.state import Change, RouteState, decode_state
from gateway.shared.connection import connect
from gateway.shared.lease import Lease, LostLease


class RedisRouteState:
    """The StateStore (gateway/routing/state.py) of several replicas."""

    def __init__(self, client: redis.Redis, key_prefix: str, poll_s: float) -> None:
        self.client = client
        self.key = f"{key_prefix}route-state"
        self.version_key = f"{self.key}:version"
        self.channel = f"{self.key}:changed"
        self.poll_s = poll_s
        server = client.connection_pool.connection_kwargs   # host and port, or a unix socket's path
        address = server.get("path") or f"{server.get('host')}:{server.get('port')}"
        self.where = f"Redis {address} key {self.key}"
        self._known: dict[str, RouteState] = {}   # the last states read or written here
        self._pubsub: PubSub | None = None

    def load(self) -> dict[str, RouteState]:
        def read(pipe: Pipeline) -> dict[str, RouteState]:
            states, lost = self._read(pipe)
            if lost:
                pipe.multi()
                self._write(pipe, states)
            return states

        with self._reachable():
            states = self.client.transaction(read, self.key, self.version_key, value_from_callable=True)
        self._known = states
        return states

    def update(self, model: str, change: Change, fence: Lease | None = None) -> dict[str, RouteState]:
        def write(pipe: Pipeline) -> dict[str, RouteState]:
            if fence is not None and pipe.get(fence.key) != fence.token:
                raise LostLease(f"the rollout leader lease {fence.key} is no longer held by {fence.token}")
            states, _ = self._read(pipe)
            states[model] = change(states.get(model) or RouteState())
            pipe.multi()
            self._write(pipe, states)
            return states

        watched = [self.key, self.version_key, *([fence.key] if fence is not None else [])]
        with self._reachable():
            states = self.client.transaction(write, *watched, value_from_callable=True)
        self._known = states
        return states

    def replace(self, states: dict[str, RouteState]) -> None:
        with self._reachable(), self.client.pipeline(transaction=True) as pipe:
            self._write(pipe, states)
            pipe.execute()
        self._known = dict(states)

    def version(self) -> str | None:
        with self._reachable():
            return self.client.get(self.version_key)

    def wait(self) -> None:
        try:
            if self._pubsub is None:
                self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self.channel)
            self._pubsub.get_message(timeout=self.poll_s)
        except redis.RedisError:
            if self._pubsub is not None:
                self._pubsub.close()
            self._pubsub = None    # subscribe again next time
            time.sleep(self.poll_s)

    def _read(self, pipe: Pipeline) -> tuple[dict[str, RouteState], bool]:
        """The saved states (in a transaction, before MULTI), or the last known ones and True when
        Redis lost them (no version key although this process has seen states)."""
        raw = pipe.hgetall(self.key)
        if pipe.get(self.version_key) is None and self._known:
            return copy.deepcopy(self._known), True   # a change may edit the states it is given
        return {model: decode_state(json.loads(doc)) for model, doc in raw.items()}, False

    def _write(self, pipe: Pipeline, states: dict[str, RouteState]) -> None:
        """Queue the whole hash's replacement, the version bump and the notice."""
        docs = {model: json.dumps(asdict(s), sort_keys=True) for model, s in states.items() if not s.is_empty()}
        pipe.delete(self.key)
        if docs:
            pipe.hset(self.key, mapping=docs)
        pipe.incr(self.version_key)
        pipe.publish(self.channel, "changed")

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            raise StateUnavailable(f"{self.where} is unreachable: {e}") from e


def open_shared(cfg: GatewayConfig, leader: bool) -> tuple[RedisRouteState | None, Lease | None]:
    """With `route_state.store: redis`: the shared store, and for the leader worker (worker 0, a
    candidate) the rollout leader lease. Without: (None, None), the state file and worker 0 lead."""
    if cfg.route_state.store != "redis":
        return None, None
    assert cfg.redis is not None  # the config says so
    client = connect(cfg.redis)
    store = RedisRouteState(client, cfg.redis.key_prefix, cfg.route_state.check_interval_s)
    lease = Lease(client, f"{cfg.redis.key_prefix}rollout-leader", cfg.route_state.lease_s) if leader else None
    return store, lease
