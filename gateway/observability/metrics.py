"""Prometheus metrics. With several workers, prometheus-client's multiprocess mode aggregates them
(the supervisor sets PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client)."""
from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    """The gateway's metric families, with label children cached so the request path only counts."""

    def __init__(self) -> None:
        self.requests = Counter("infergate_requests_total", "Inference requests answered, by model, protocol and status code",
                                ["model", "protocol", "code"])
        self.latency = Histogram("infergate_request_duration_seconds", "Time from request decoded to answer ready",
                                 ["model", "protocol"], buckets=LATENCY_BUCKETS)
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, model: str, protocol: str, code: str, seconds: float) -> None:
        key = (model, protocol, code)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.requests.labels(*key), self.latency.labels(model, protocol))
        pair[0].inc()
        pair[1].observe(seconds)


def exposition() -> bytes:
    """The text format for /metrics: this process's registry, or all workers' in multiprocess mode."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()
