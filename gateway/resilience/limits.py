"""Rate limits: leaky buckets (aiolimiter) per model, per client and global, checked before a
request costs anything. Over a limit the request is refused at once with RESOURCE_EXHAUSTED /
HTTP 429 and a Retry-After, never queued. Built with each routing snapshot, so limits reload
with the file (buckets start full again on a change).

A limit of scope `global` holds across replicas: its local bucket is checked first (cheap, and
all that is left when Redis is down and the limit fails open), then this process's lease of the
shared bucket in Redis (resilience/leases.py)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from gateway.config import RateLimit
from gateway.errors import ResourceExhausted, Unavailable
from gateway.resilience.leases import Lease, SharedBuckets

MAX_CLIENTS = 10_000  # per-client buckets kept; the least recently seen client is forgotten first


def bucket(spec: RateLimit) -> AsyncLimiter:
    """`rate` requests per second on average, up to `burst` at once."""
    return AsyncLimiter(spec.burst, spec.burst / spec.rate)


@dataclass(frozen=True, slots=True, eq=False)
class Limit:
    """One limit as a request meets it: the local bucket, and the lease of the shared one (scope global)."""

    spec: RateLimit
    local: AsyncLimiter
    shared: Lease | None
    whose: str   # for the refusal: "model 'm'", "client c", "the gateway"
    scope: str   # model | client | global: a metric label


class Limits:
    """The global and per-client limits of one routing snapshot, and the maker of per-model ones
    (which live on routes)."""

    def __init__(self, global_limit: RateLimit | None, per_client: RateLimit | None,
                 shared: SharedBuckets | None = None) -> None:
        self.shared = shared
        self.global_limit = self.limit(global_limit, "global", "", "the gateway") if global_limit else None
        self.per_client = per_client
        self._clients: OrderedDict[str, Limit] = OrderedDict()

    def limit(self, spec: RateLimit, scope: str, name: str, whose: str) -> Limit:
        """A limit's buckets: local always, a lease of the shared bucket for scope global."""
        lease = None
        if spec.scope == "global":
            assert self.shared is not None, "config.load refuses a global limit without a redis section"
            lease = self.shared.lease(scope, name, spec)
            whose += " across replicas"
        return Limit(spec, bucket(spec), lease, whose, scope)

    def model(self, model: str, spec: RateLimit | None) -> Limit | None:
        """The per-model limit of a route (None: the route has none)."""
        return self.limit(spec, "model", model, f"model '{model}'") if spec else None

    def applies(self, model_limit: RateLimit | None) -> bool:
        """Whether a route with this model limit has any bucket to check."""
        return model_limit is not None or self.per_client is not None or self.global_limit is not None

    async def admit(self, client: str, model: str, model_limit: Limit | None) -> None:
        """Take one unit from every limit that applies, or none and raise ResourceExhausted
        (or Unavailable: a global limit that fails closed while Redis is down)."""
        limits = [lim for lim in (model_limit, self._client_limit(client) if self.per_client else None,
                                  self.global_limit) if lim is not None]
        for lim in limits:  # the local buckets first: cheap, and they spare the shared ones
            if not lim.local.has_capacity():
                raise _over(lim, 1.0 / lim.spec.rate)
        for lim in limits:
            if lim.shared is not None:
                await lim.shared.ready()  # returns at once while this process holds a token of it
        degraded = []
        for lim in limits:  # decided without yielding from here on: nothing can take in between
            if not lim.local.has_capacity():
                raise _over(lim, 1.0 / lim.spec.rate)
            state = lim.shared.state() if lim.shared is not None else "token"
            if state == "dry":
                raise _over(lim, lim.shared.retry_after())
            if state == "down":
                if not lim.shared.fail_open:
                    self.shared.on_degraded(lim.scope, "refused")
                    raise Unavailable(f"rate limit of {lim.whose} cannot be checked: the shared limit store (Redis) "
                                      f"is unreachable and the limit fails closed")
                degraded.append(lim)
        for lim in limits:
            await lim.local.acquire()  # capacity was just checked: returns at once, without yielding
            if lim.shared is not None and lim not in degraded:
                lim.shared.take()
        for lim in degraded:
            self.shared.on_degraded(lim.scope, "admitted")

    def _client_limit(self, client: str) -> Limit:
        found = self._clients.get(client)
        if found is None:
            assert self.per_client is not None
            found = self._clients[client] = self.limit(self.per_client, "client", client, f"client {client}")
            if len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return found


def _over(lim: Limit, wait: float) -> ResourceExhausted:
    return ResourceExhausted(f"rate limit of {lim.whose} exceeded ({lim.spec.rate:g}/s); retry after {wait:.3g}s",
                             retry_after_s=wait, scope=lim.scope)
