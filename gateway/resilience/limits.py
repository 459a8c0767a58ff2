"""Rate limits: leaky buckets (aiolimiter) per model, per client and global, checked before a
request costs anything. Over a limit the request is refused at once with RESOURCE_EXHAUSTED /
HTTP 429 and a Retry-After, never queued. Built with each routing snapshot, so limits reload
with the file (buckets start full again on a change)."""
from __future__ import annotations

from collections import OrderedDict

from aiolimiter import AsyncLimiter

from gateway.config import RateLimit
from gateway.errors import ResourceExhausted

MAX_CLIENTS = 10_000  # per-client buckets kept; the least recently seen client is forgotten first


def bucket(spec: RateLimit) -> AsyncLimiter:
    """`rate` requests per second on average, up to `burst` at once."""
    return AsyncLimiter(spec.burst, spec.burst / spec.rate)


class Limits:
    """The global and per-client limits of one routing snapshot (per-model ones live on routes)."""

    def __init__(self, global_limit: RateLimit | None, per_client: RateLimit | None) -> None:
        self.global_bucket = bucket(global_limit) if global_limit else None
        self.per_client = per_client
        self._clients: OrderedDict[str, AsyncLimiter] = OrderedDict()

    def applies(self, model_limit: RateLimit | None) -> bool:
        """Whether a route with this model limit has any bucket to check."""
        return model_limit is not None or self.per_client is not None or self.global_bucket is not None

    async def admit(self, client: str, model: str, model_bucket: AsyncLimiter | None) -> None:
        """Take one unit from every bucket that applies, or none and raise ResourceExhausted."""
        buckets = []
        if model_bucket is not None:
            buckets.append((model_bucket, f"model '{model}'", "model"))
        if self.per_client is not None:
            buckets.append((self._client_bucket(client), f"client {client}", "client"))
        if self.global_bucket is not None:
            buckets.append((self.global_bucket, "the gateway", "global"))
        for b, whose, scope in buckets:
            if not b.has_capacity():
                wait = 1.0 / (b.max_rate / b.time_period)
                raise ResourceExhausted(f"rate limit of {whose} exceeded ({b.max_rate / b.time_period:g}/s); "
                                        f"retry after {wait:.3g}s", retry_after_s=wait, scope=scope)
        for b, _, _ in buckets:
            await b.acquire()  # capacity was just checked: returns at once, without yielding

    def _client_bucket(self, client: str) -> AsyncLimiter:
        found = self._clients.get(client)
        if found is None:
            assert self.per_client is not None
            found = self._clients[client] = bucket(self.per_client)
            if len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return found
