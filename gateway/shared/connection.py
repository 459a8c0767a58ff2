"""The Redis client every shared part uses: short timeouts and one immediate retry (a pooled
connection that died with a Redis restart reconnects once), never redis-py's default backoff,
which would hold a caller for seconds while Redis is down."""
from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway import config

DOWN = (redis.ConnectionError, redis.TimeoutError)   # Redis unreachable or too slow: a soft failure


def connect(spec: config.Redis) -> redis.Redis:
    """A client for spec.url (connects lazily); strings in, strings out."""
    return redis.Redis.from_url(spec.url, socket_timeout=spec.timeout_s, socket_connect_timeout=spec.timeout_s,
                                retry=Retry(NoBackoff(), 1), decode_responses=True)
