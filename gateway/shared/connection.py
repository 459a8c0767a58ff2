"""The blocking Redis client of the route state store and the leader lease: short timeouts and one
immediate retry (a pooled connection that died with a Redis restart reconnects once), never
redis-py's default backoff, which would hold a caller for seconds while Redis is down."""
from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway import config


def connect(spec: config.RedisSpec) -> redis.Redis:
    """A blocking client for spec.url (connects lazily; callers run it off the event loop);
    strings in, strings out."""
    return redis.Redis.from_url(spec.url, socket_timeout=spec.timeout_s, socket_connect_timeout=spec.connect_timeout_s,
                                retry=Retry(NoBackoff(), 1), decode_responses=True)
