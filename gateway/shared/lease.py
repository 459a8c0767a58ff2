"""The rollout leader lease: one Redis key holding a random token, taken with SET NX PX and
renewed or released only by its holder (compare-and-set Lua scripts). A holder that dies stops
renewing; the key expires after ttl_s and another replica takes it. Writes made as leader are
fenced: the route state store checks, inside the write's transaction, that the key still holds
this token (`gateway/shared/route_state.py`)."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Callable

import redis

log = logging.getLogger(__name__)

_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class LostLease(Exception):
    """A write made as leader found the lease expired or held by another process: not written."""


class Lease:
    """One process's claim on the lease `key`. Every call is one Redis round trip and may raise
    redis errors (the caller decides what an unreachable Redis means)."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"  # who, for people reading Redis
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._valid_until = 0.0   # monotonic: the lease is ours until then, by our own clock

    @property
    def held(self) -> bool:
        """This process may act as leader: its last acquire or renew succeeded less than ttl_s ago
        (measured from before the request went out, so never later than Redis expires the key)."""
        return time.monotonic() < self._valid_until

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (SET NX PX)."""
        start = time.monotonic()
        if self.client.set(self.key, self.token, nx=True, px=self._ttl_ms):
            self._valid_until = start + self.ttl_s
            return True
        return False

    def renew(self) -> bool:
        """Extend the lease by ttl_s if this process still holds it; False (and not held) otherwise."""
        start = time.monotonic()
        ok = bool(self._renew(keys=[self.key], args=[self.token, self._ttl_ms]))
        self._valid_until = start + self.ttl_s if ok else 0.0
        return ok

    def hold(self) -> bool:
        """Renew the lease if this process holds it, else try to take it; whether it holds it now."""
        return self.renew() or self.acquire()

    def release(self) -> bool:
        """Give the lease up at once (a draining leader), if still ours."""
        self._valid_until = 0.0
        return bool(self._release(keys=[self.key], args=[self.token]))

    def holder(self) -> str | None:
        """The token of whoever holds the lease now, if anyone."""
        return self.client.get(self.key)

    async def keep(self, on_change: Callable[[bool], None]) -> None:
        """Hold the lease while this task runs: renew it (or try to take it) every third of the
        TTL, off the event loop; on_change(held) at every change, logged. Never dies: while Redis
        is unreachable the lease lapses by its own clock, and is taken again when Redis answers."""
        leading, failing = False, False
        while True:
            try:
                await asyncio.to_thread(self.hold)
                if failing:
                    log.info("rollout leader lease %s: Redis answers again", self.key)
                failing = False
            except redis.RedisError as e:
                if not failing:
                    log.error("rollout leader lease %s: Redis unreachable (%s); this process stops deciding "
                              "rollouts when its lease runs out", self.key, e)
                failing = True
            if self.held != leading:
                leading = self.held
                if leading:
                    log.info("rollout leader: this process holds the lease %s (%s); its rollout controller decides",
                             self.key, self.token)
                else:
                    log.warning("rollout leader: this process no longer holds the lease %s; another decides", self.key)
                on_change(leading)
            await asyncio.sleep(self.ttl_s / 3)

    async def hand_over(self) -> None:
        """A draining leader gives the lease up, so another replica decides at once, not after the TTL."""
        try:
            if await asyncio.to_thread(self.release):
                log.info("rollout leader lease %s released", self.key)
        except redis.RedisError as e:
            log.warning("rollout leader lease %s not released (%s); it expires within %.1fs", self.key, e, self.ttl_s)
