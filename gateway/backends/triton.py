"""A Triton service reached over pooled grpc.aio channels: replicas with power-of-two-choices
balancing, outlier ejection and budgeted retries; a metadata cache; health probing."""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from typing import Any, Callable

import grpc
import orjson

from gateway.backends.streams import StreamPool
from gateway.config import Backend as BackendConfig
from gateway.errors import BackendError, DeadlineExceeded, Unavailable
from gateway.protocol.wire import SERVICE, pb, pb_grpc
from gateway.resilience.retry import RetryBudget, jittered

log = logging.getLogger(__name__)

_INFER = f"/{SERVICE}/ModelInfer"
Metadata = tuple[tuple[str, str], ...]  # gRPC metadata sent with one call (the trace context)
MANIFEST_PARAMETER = "infergate_manifest_"  # + version: a model config parameter registry-sync writes


class Replica:
    """One Triton endpoint of a backend: pooled channels, calls in flight, consecutive failures
    and ejection (outlier detection, as Envoy does it)."""

    def __init__(self, url: str, config: BackendConfig, options: list[tuple[str, Any]],
                 credentials: grpc.ChannelCredentials | None) -> None:
        self.url = url
        self.healthy = False
        self.outstanding = 0
        self.failures = 0
        self.ejected_until = 0.0
        self.channels = [grpc.aio.secure_channel(url, credentials, options=options) if credentials else
                         grpc.aio.insecure_channel(url, options=options) for _ in range(config.channels)]
        infers = [ch.unary_unary(_INFER, request_serializer=None, response_deserializer=None) for ch in self.channels]
        self._next_infer: Callable[[], Any] = itertools.cycle(infers).__next__
        self._streams = StreamPool(self.channels, config.streams, self._unary) if config.transport == "stream" else None
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channels[0])

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    async def infer(self, payload: bytes, timeout: float, request_id: str, metadata: Metadata = ()) -> bytes:
        """metadata goes with a unary call; a shared stream carries none per request."""
        self.outstanding += 1
        try:
            if self._streams is not None:
                return await self._streams.infer(payload, timeout, request_id)
            return await self._unary(payload, timeout, metadata)
        finally:
            self.outstanding -= 1

    async def _unary(self, payload: bytes, timeout: float, metadata: Metadata = ()) -> bytes:
        try:
            return await self._next_infer()(payload, timeout=timeout, metadata=metadata or None)
        except grpc.aio.AioRpcError as e:
            raise _translate(e) from None

    def outcome(self, failed: bool, config: BackendConfig) -> None:
        """Count consecutive failures; eject for eject_s after eject_after of them."""
        if not failed:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= config.eject_after:
            self.ejected_until = time.monotonic() + config.eject_s
            self.failures = 0
            log.warning("replica %s ejected for %.1fs after %d consecutive failures", self.url, config.eject_s, config.eject_after)

    async def close(self) -> None:
        if self._streams is not None:
            await self._streams.close()
        for channel in self.channels:
            await channel.close()


class TritonBackend:
    """One Triton service, one or more replicas. `infer` forwards serialized requests as bytes,
    never re-encoding them, to the replica with fewer calls in flight of two picked at random;
    a replica that fails is retried elsewhere within the retry budget and the deadline."""

    def __init__(self, name: str, config: BackendConfig, max_message_bytes: int,
                 on_retry: Callable[[str, str], None] = lambda backend, result: None,
                 tls: tuple[grpc.ChannelCredentials, list[tuple[str, Any]]] | None = None) -> None:
        """tls: channel credentials and their options, for TLS or mutual TLS to Triton."""
        self.name = name
        self.config = config
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
            *(tls[1] if tls else ()),
        ]
        self.replicas = [Replica(url, config, options, tls[0] if tls else None) for url in config.endpoints()]
        self.budget = RetryBudget(config.retry_budget)
        self._on_retry = on_retry
        self._cache: dict[tuple[str, str, str], tuple[float, Any]] = {}
        self._prober: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    async def infer(self, payload: bytes, timeout: float, request_id: str, metadata: Metadata = ()) -> bytes:
        """Send one serialized ModelInferRequest; return the serialized ModelInferResponse.
        request_id is the id the caller sent, which the answer must carry; metadata (the trace
        context) goes with it to Triton."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.budget.deposit()
        tried: list[Replica] = []
        while True:
            replica = self._pick(tried)
            try:
                answer = await replica.infer(payload, deadline - loop.time(), request_id, metadata)
            except (Unavailable, DeadlineExceeded) as e:
                replica.outcome(True, self.config)
                tried.append(replica)
                pause = jittered(self.config.retry_backoff_s)
                if not isinstance(e, Unavailable) or len(tried) > self.config.retries \
                        or len(tried) >= len(self.replicas) or deadline - loop.time() <= pause:
                    raise
                if not self.budget.withdraw():
                    self._on_retry(self.name, "over_budget")
                    raise
                self._on_retry(self.name, "sent")
                await asyncio.sleep(pause)
                continue
            replica.outcome(False, self.config)
            return answer

    def _pick(self, tried: list[Replica]) -> Replica:
        """Power of two choices by calls in flight among available replicas not yet tried
        (all untried ones when none is available: better a doubtful replica than none)."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        now = time.monotonic()
        fresh = [r for r in self.replicas if r not in tried] or self.replicas
        pool = [r for r in fresh if r.available(now)] or fresh
        if len(pool) == 1:
            return pool[0]
        a, b = random.sample(pool, 2)
        return a if a.outstanding <= b.outstanding else b

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Any other GRPCInferenceService method by name, answered as Triton answers it."""
        replica = self._pick([])
        try:
            return await getattr(replica.stub, method)(request, timeout=timeout or self.config.request_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _translate(e) from None

    async def cached(self, method: str, model: str, version: str) -> Any:
        """ModelMetadata or ModelConfig, kept for metadata_ttl_s (models change only on reload)."""
        key = (method, model, version)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        request_type = pb.ModelMetadataRequest if method == "ModelMetadata" else pb.ModelConfigRequest
        answer = await self.call(method, request_type(name=model, version=version))
        self._cache[key] = (now + self.config.metadata_ttl_s, answer)
        return answer

    def start(self) -> None:
        """Begin health probing (ServerReady on every replica every health_interval_s)."""
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def probe(self) -> bool:
        await asyncio.gather(*(self._probe(r) for r in self.replicas))
        return self.healthy

    async def _probe(self, replica: Replica) -> None:
        try:
            answer = await replica.stub.ServerReady(pb.ServerReadyRequest(), timeout=self.config.connect_timeout_s)
            healthy = bool(answer.ready)
        except grpc.aio.AioRpcError:
            healthy = False
        if healthy != replica.healthy:
            log.info("backend %s replica %s is %s", self.name, replica.url, "ready" if healthy else "NOT ready")
            replica.healthy = healthy
            if not self.healthy:
                self._cache.clear()

    async def _probe_forever(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.config.health_interval_s)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        for replica in self.replicas:
            await replica.close()


def registry_manifest(config: Any, version: str) -> dict[str, Any] | None:
    """The registry manifest (lineage, trained_at, digest) registry-sync wrote into a model's config
    for one version, as the parameter `infergate_manifest_<version>`; None when there is none."""
    key = MANIFEST_PARAMETER + version
    if not version or key not in config.parameters:
        return None
    try:
        doc = orjson.loads(config.parameters[key].string_value)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _translate(e: grpc.aio.AioRpcError) -> BackendError | Unavailable | DeadlineExceeded:
    """Triton's code and message unchanged; transport failures keep their gRPC code too."""
    code = e.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(e.details() or "Deadline Exceeded")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(e.details() or "backend unavailable")
    return BackendError(e.details() or code.name, code)
