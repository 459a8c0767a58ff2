"""One process's link to the Redis shared by every gateway replica.

Calls time out after `timeout_s` and are never retried inline: a failed call marks the link
down, and while it is down callers do not wait on Redis at all (they apply their own declared
policy). A background task PINGs every `retry_s` and marks the link up again when Redis answers;
redis-py opens fresh connections by itself, and scripts are reloaded on NOSCRIPT after a restart.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, TypeVar

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gateway.config import RedisSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisLink:
    """The Redis client, its up/down state and the key names under the deployment's prefix."""

    def __init__(self, spec: RedisSpec, on_error: Callable[[str], None] = lambda use: None) -> None:
        self.spec = spec
        self.client = Redis.from_url(spec.url, socket_timeout=spec.timeout_s, socket_connect_timeout=spec.connect_timeout_s,
                                     retry=Retry(NoBackoff(), 0))
        self.up = True  # until a call fails
        self.where = spec.url.rpartition("@")[2]  # for the log: the URL without credentials
        self._on_error = on_error
        self._probe: asyncio.Task[None] | None = None
        self._closing = False  # calls still in flight at shutdown fail quietly

    def key(self, *parts: str) -> str:
        """A key under the deployment's prefix: prefix + parts joined by ':'."""
        return self.spec.key_prefix + ":".join(parts)

    async def call(self, use: str, pending: Awaitable[T]) -> T | None:
        """Await one Redis call made for `use` (limits, drift); on any failure None, the error
        counted, and the link down until a PING answers."""
        try:
            return await pending
        except (RedisError, OSError) as e:
            if self._closing:
                return None
            self._on_error(use)
            if self.up:
                self.up = False
                log.warning("redis %s unreachable (%s: %s); shared state degraded, trying again every %gs",
                            self.where, type(e).__name__, e, self.spec.retry_s)
                self._probe = asyncio.create_task(self._reconnect())
            return None

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.spec.retry_s)
            try:
                await self.client.ping()
            except (RedisError, OSError):
                continue
            self.up = True
            log.info("redis %s reachable again", self.where)
            return

    async def close(self) -> None:
        self._closing = True
        if self._probe is not None:
            self._probe.cancel()
        await self.client.aclose()
