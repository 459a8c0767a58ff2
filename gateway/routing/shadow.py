"""Shadow calls: after the primary has answered, send the same request to shadow targets, compare
their outputs with the primary's and export agreement. A bounded queue and a fixed number of
workers cap the cost; when the queue is full the shadow is dropped and counted, never waited for.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gateway.audit.trail import Auditor
from gateway.config import Compare
from gateway.errors import GatewayError
from gateway.observability.metrics import Metrics
from gateway.observability.trace import current as current_trace
from gateway.protocol.tensors import DTYPES
from gateway.protocol.wire import pb

if TYPE_CHECKING:
    from gateway.dataplane import Call
    from gateway.routing.table import Route, ShadowTarget, Target

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Comparison:
    agree: bool
    max_abs_diff: float      # over every numeric output; inf when shapes or names differ
    argmax_agree: bool | None


def compare(primary: pb.ModelInferResponse, shadow: pb.ModelInferResponse, rule: Compare) -> Comparison:
    """Compare two answers output by output, by name."""
    theirs = {t.name: (t, shadow.raw_output_contents[i]) for i, t in enumerate(shadow.outputs)
              if i < len(shadow.raw_output_contents)}
    worst, argmax_ok = 0.0, True
    for i, tensor in enumerate(primary.outputs):
        other = theirs.get(tensor.name)
        dtype = DTYPES.get(tensor.datatype)
        if other is None or other[0].datatype != tensor.datatype or list(other[0].shape) != list(tensor.shape):
            return Comparison(False, float("inf"), False if rule.argmax else None)
        mine = primary.raw_output_contents[i] if i < len(primary.raw_output_contents) else b""
        if dtype is None:  # BYTES and the like: equal or not
            worst = max(worst, 0.0 if mine == other[1] else float("inf"))
            continue
        a, b = np.frombuffer(mine, dtype).astype(np.float64), np.frombuffer(other[1], dtype).astype(np.float64)
        if a.size != b.size or a.size != int(np.prod(tensor.shape)):
            return Comparison(False, float("inf"), False if rule.argmax else None)
        a, b = a.reshape(tuple(tensor.shape)), b.reshape(tuple(tensor.shape))
        if a.size:
            diff = np.abs(a - b)
            both_nan = np.isnan(a) & np.isnan(b)  # NaN where the primary has NaN too is agreement
            worst = max(worst, float("inf") if np.isnan(diff[~both_nan]).any() else float(np.max(diff, initial=0.0, where=~both_nan)))
            if rule.argmax and a.ndim:
                argmax_ok = argmax_ok and bool(np.array_equal(a.argmax(axis=-1), b.argmax(axis=-1)))
    agree = (rule.atol is None or worst <= rule.atol) and (argmax_ok or not rule.argmax)
    return Comparison(agree, worst, argmax_ok if rule.argmax else None)


class ShadowDispatcher:
    """Queue of shadow calls with `concurrency` workers; `offer` never blocks."""

    def __init__(self, metrics: Metrics, audit: Auditor | None = None, queue_size: int = 1024, concurrency: int = 4,
                 log_per_minute: int = 10) -> None:
        self.metrics = metrics
        self.audit = audit
        self._queue: asyncio.Queue[tuple[Route, ShadowTarget, Call, bytes]] = asyncio.Queue(queue_size)
        self._concurrency = concurrency
        self._workers: list[asyncio.Task[None]] = []
        self._log_budget = log_per_minute
        self._logged: list[float] = []

    def start(self) -> None:
        self._workers = [asyncio.get_running_loop().create_task(self._work()) for _ in range(self._concurrency)]

    def offer(self, route: Route, call: Call, served_by: Target, primary: bytes) -> None:
        """Queue the shadows this request is sampled into (after the primary has answered)."""
        for shadow in route.shadows:
            if shadow.target is served_by or random.random() >= shadow.rate:
                continue
            try:
                self._queue.put_nowait((route, shadow, call, primary))
            except asyncio.QueueFull:
                self.metrics.shadow(route.public, shadow.target.name, "dropped")

    async def _work(self) -> None:
        while True:
            route, shadow, call, primary = await self._queue.get()
            try:
                await self._run(route, shadow, call, primary)
            except Exception:  # noqa: BLE001 - a shadow must never take the worker down
                log.exception("shadow call failed unexpectedly")

    async def _run(self, route: Route, shadow: ShadowTarget, call: Call, primary: bytes) -> None:
        """One shadow call, in a span of its own under the request's; audited (when the log is on)
        whatever happens to it."""
        target = shadow.target
        span = call.trace.child()
        current_trace.set(span)
        start = time.perf_counter()
        code, message, answer, agree = "INTERNAL", "shadow comparison failed", None, None
        try:
            answer = await target.backend.infer(call.raw + target.default_suffix, target.timeout_s, call.request_id,
                                                span.headers())
            result = compare(pb.ModelInferResponse.FromString(primary), pb.ModelInferResponse.FromString(answer),
                             shadow.compare)
            code, message, agree = "OK", "", result.agree
        except GatewayError as e:
            code, message = e.code.name, e.message
            self.metrics.shadow(route.public, target.name, "error")
            log.debug("shadow %s/%s failed: %s", route.public, target.name, e.message)
            return
        finally:
            if self.audit is not None:
                self.audit.shadow(call, span, route.public, target.name, target.version, code, message,
                                  time.perf_counter() - start, answer, agree)
        self.metrics.shadow(route.public, target.name, "agree" if result.agree else "disagree", result.max_abs_diff)
        if not result.agree and self._may_log():
            log.warning("shadow disagreement: model=%s shadow=%s request_id=%s max_abs_diff=%g argmax_agree=%s",
                        route.public, target.name, call.request_id or "-", result.max_abs_diff, result.argmax_agree)

    def _may_log(self) -> bool:
        now = time.monotonic()
        self._logged = [t for t in self._logged if now - t < 60]
        if len(self._logged) >= self._log_budget:
            return False
        self._logged.append(now)
        return True

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
