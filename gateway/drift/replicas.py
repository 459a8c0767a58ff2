"""Drift counts merged across gateway replicas through Redis.

Each replica's leader worker, on every drift tick, writes its replica's judged counts (already
merged over its workers) into one Redis hash per monitored (model, target, profile version),
field = replica id, and reads every other live replica's back in the same round trip; the sum is
what it judges. Counts are exact sums of histogram bins, so the statistics equal those of one
process that saw all the traffic (the same window kind and size on every replica). A replica
that stops publishing is dropped after three ticks. Prometheus counters could carry the bins as
well, but KS needs cumulative distributions and PSI / chi-squared need floors, logs and p-values
per bin that PromQL expresses poorly, and count or time windows are not counters' running
totals; summing the counts where the statistics are computed keeps one implementation of them.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import socket
from typing import TYPE_CHECKING

from gateway.drift.state import Counts
from gateway.shared.link import RedisLink

if TYPE_CHECKING:
    from gateway.drift.monitor import Key

log = logging.getLogger(__name__)

# KEYS[1] counts by replica (hash), KEYS[2] when each replica last wrote (sorted set, Redis ms);
# ARGV replica id, its counts, ms after which a silent replica is forgotten. Write, forget the
# silent ones, keep both keys as long, and return every live replica's counts (field, value, ...).
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.0f', now), ARGV[1])
for _, replica in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now - tonumber(ARGV[3])))) do
  redis.call('HDEL', KEYS[1], replica)
  redis.call('ZREM', KEYS[2], replica)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""


class ReplicaMerge:
    """This replica's side of the exchange (run by its leader worker only)."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.replica = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}".encode()
        self.publish = link.client.register_script(PUBLISH)

    def keys(self, key: Key) -> list[str]:
        """The hash and sorted set of one monitor ({...}: one Redis Cluster slot for both)."""
        tag = "{" + "|".join(key) + "}"
        return [self.link.key("drift", tag, "counts"), self.link.key("drift", tag, "seen")]

    async def merge(self, mine: dict[Key, Counts], interval_s: float) -> dict[Key, Counts]:
        """Publish this replica's counts; the sum over every live replica, this one included
        (this replica's alone while Redis is down)."""
        if not mine or not self.link.up:
            return mine
        forget_ms = math.ceil((3 * interval_s + self.link.spec.timeout_s) * 1000)
        pipe = self.link.client.pipeline(transaction=False)
        for key, counts in mine.items():
            await self.publish(keys=self.keys(key), args=[self.replica, counts.to_bytes(), forget_ms], client=pipe)  # queued
        answers = await self.link.call("drift", pipe.execute())
        if answers is None:
            return mine
        merged = {}
        for (key, total), flat in zip(mine.items(), answers):
            for replica, data in zip(flat[::2], flat[1::2]):
                if replica == self.replica:
                    continue
                try:
                    total = total.merge(Counts.from_bytes(data))
                except ValueError as e:  # a replica on another profile layout (mid-deploy)
                    log.warning("drift counts of %s from replica %s skipped: %s", key, replica.decode(errors="replace"), e)
            merged[key] = total
        return merged
