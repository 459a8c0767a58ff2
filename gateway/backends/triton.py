"""A Triton server reached over pooled grpc.aio channels: infer, metadata cache, health probing."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Callable

import grpc

from gateway.backends.streams import StreamPool
from gateway.config import Backend as BackendConfig
from gateway.errors import BackendError, DeadlineExceeded, Unavailable
from gateway.protocol.wire import SERVICE, pb, pb_grpc

log = logging.getLogger(__name__)

_INFER = f"/{SERVICE}/ModelInfer"


class TritonBackend:
    """One Triton server. `infer` forwards serialized requests as bytes, never re-encoding them."""

    def __init__(self, name: str, config: BackendConfig, max_message_bytes: int) -> None:
        self.name = name
        self.config = config
        self.healthy = False
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
        ]
        self._channels = [grpc.aio.insecure_channel(config.url, options=options) for _ in range(config.channels)]
        infers = [ch.unary_unary(_INFER, request_serializer=None, response_deserializer=None) for ch in self._channels]
        self._next_infer: Callable[[], Any] = itertools.cycle(infers).__next__
        self._streams = StreamPool(self._channels, config.streams, self._unary) if config.transport == "stream" else None
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channels[0])
        self._cache: dict[tuple[str, str, str], tuple[float, Any]] = {}
        self._prober: asyncio.Task[None] | None = None

    async def infer(self, payload: bytes, timeout: float, request_id: str) -> bytes:
        """Send one serialized ModelInferRequest; return the serialized ModelInferResponse.
        request_id is the id the caller sent, which the answer must carry."""
        if self._streams is not None:
            return await self._streams.infer(payload, timeout, request_id)
        return await self._unary(payload, timeout)

    async def _unary(self, payload: bytes, timeout: float) -> bytes:
        try:
            return await self._next_infer()(payload, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _translate(e) from None

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Any other GRPCInferenceService method by name, answered as Triton answers it."""
        try:
            return await getattr(self._stub, method)(request, timeout=timeout or self.config.request_timeout_s)
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
        """Begin health probing (ServerReady every health_interval_s)."""
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def probe(self) -> bool:
        try:
            answer = await self._stub.ServerReady(pb.ServerReadyRequest(), timeout=self.config.connect_timeout_s)
            healthy = bool(answer.ready)
        except grpc.aio.AioRpcError:
            healthy = False
        if healthy != self.healthy:
            log.info("backend %s (%s) is %s", self.name, self.config.url, "ready" if healthy else "NOT ready")
            self.healthy = healthy
            if not healthy:
                self._cache.clear()
        return healthy

    async def _probe_forever(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.config.health_interval_s)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        if self._streams is not None:
            await self._streams.close()
        for channel in self._channels:
            await channel.close()


def _translate(e: grpc.aio.AioRpcError) -> BackendError | Unavailable | DeadlineExceeded:
    """Triton's code and message unchanged; transport failures keep their gRPC code too."""
    code = e.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(e.details() or "Deadline Exceeded")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(e.details() or "backend unavailable")
    return BackendError(e.details() or code.name, code)
