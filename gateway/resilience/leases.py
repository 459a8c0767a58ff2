"""Global rate limits: one token bucket per limit in Redis, shared by every gateway replica, and
each process's lease of it.

The bucket is refilled and taken from by one Lua script (atomic, on Redis's clock). A process
does not ask Redis per request: it takes up to `lease` tokens at a time and spends them locally,
topping its lease up in the background once half of it is spent; a request waits for Redis only
when its process holds no token at all (its first request, or traffic faster than the top-up).
The script also says how long until the shared bucket holds half a lease again; until then (plus
a random part of that time, so that no process always asks first) the process asks no more: it
spends what it holds, then refuses locally.

Error bound: Redis grants at most burst + rate * T tokens in any window of T seconds, and the
P processes (replicas x workers) hold at most `lease` tokens each when the window opens, so the
replicas together admit at most P * lease requests more than one exact bucket would. Under
sustained overload they admit at least that many fewer only transiently (tokens leased by
processes that stopped getting traffic). See docs/resilience.md.
"""
from __future__ import annotations

import asyncio
import random
from typing import Callable

from gateway.config import RateLimit
from gateway.shared.link import RedisLink

# KEYS[1] the bucket (a hash of tokens and the time they were counted); ARGV rate (tokens per
# second), burst, want. Refill by the time passed, grant what is there up to want, keep the key
# until it would be full again. Returns {granted, ms until the bucket holds half of want again}.
TAKE = """
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
local need = math.max(1, math.ceil(want / 2))
local wait = 0
if tokens < need then wait = math.ceil((need - tokens) / rate * 1000) end
return {granted, wait}
"""


class SharedBuckets:
    """The process's side of every global limit: the link, the script, and how degraded
    decisions are counted (on_degraded(scope, 'admitted' | 'refused'))."""

    def __init__(self, link: RedisLink, on_degraded: Callable[[str, str], None] = lambda scope, decision: None) -> None:
        self.link = link
        self.on_degraded = on_degraded
        self.script = link.client.register_script(TAKE)

    def lease(self, scope: str, name: str, spec: RateLimit) -> Lease:
        """This process's lease of the shared bucket of one limit. The key names the rate and
        burst, so a changed limit starts a fresh bucket (as local buckets do on reload)."""
        parts = ["limit", scope, f"{spec.rate:g}/{spec.burst}"] + ([name] if name else [])
        return Lease(self, self.link.key(*parts), spec)


class Lease:
    """Tokens this process holds of one shared bucket; `ready` then `state` then `take`."""

    def __init__(self, buckets: SharedBuckets, key: str, spec: RateLimit) -> None:
        self.buckets = buckets
        self.key = key
        self.rate, self.burst, self.size = spec.rate, spec.burst, spec.lease_size()
        self.fail_open = spec.on_redis_down != "fail_closed"
        self.balance = 0             # tokens held, at most size
        self.dry_until = 0.0         # loop time before which the shared bucket holds less than half a lease
        self._fetch: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        """While no token is held and Redis may have some: wait for a fetch (one at a time, shared
        by every request waiting on this lease; a cancelled request does not cancel it). Each
        round either brings tokens, finds the bucket dry, or finds Redis down."""
        while self.balance == 0 and self.buckets.link.up and not self._dry():
            await asyncio.shield(self._refill())

    def state(self) -> str:
        """'token' (one is held), 'dry' (none to be had now) or 'down' (Redis is)."""
        if self.balance > 0:
            return "token"
        return "dry" if self._dry() or self.buckets.link.up else "down"

    def retry_after(self) -> float:
        """Seconds until the shared bucket has tokens again (at least one token's time)."""
        return max(self.dry_until - asyncio.get_running_loop().time(), 1.0 / self.rate)

    def take(self) -> None:
        """Spend one held token; from half a lease down, top it up in the background."""
        self.balance -= 1
        if self.balance <= self.size // 2 and self.buckets.link.up and not self._dry():
            self._refill()

    def _dry(self) -> bool:
        return self.dry_until > asyncio.get_running_loop().time()

    def _refill(self) -> asyncio.Task[None]:
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.create_task(self._top_up())
        return self._fetch

    async def _top_up(self) -> None:
        want = self.size - self.balance   # tokens spent meanwhile only lower the balance: it stays <= size
        if want <= 0:
            return
        answer = await self.buckets.link.call("limits", self.buckets.script(keys=[self.key], args=[self.rate, self.burst, want]))
        if answer is None:
            return
        granted, wait_ms = int(answer[0]), int(answer[1])
        self.balance += granted
        # jittered: else the process whose wait ends first takes every refill; tokens wait in Redis meanwhile
        self.dry_until = asyncio.get_running_loop().time() + wait_ms / 1000 * random.uniform(1.0, 1.5)
