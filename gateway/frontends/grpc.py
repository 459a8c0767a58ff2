"""inference.GRPCInferenceService as Triton serves it, over grpc.aio.

ModelInfer and ModelStreamInfer take and return bytes (no deserialiser in grpc), so tensors are
never re-encoded; only the few header fields the dataplane needs are read.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from gateway import __version__
from gateway.dataplane import Call, DataPlane
from gateway.errors import GatewayError, InvalidArgument
from gateway.observability.trace import TRACEPARENT, Trace
from gateway.outcomes import feedback as outcome_feedback
from gateway.protocol import feedback_pb2
from gateway.protocol.wire import SERVICE, parameter_text, pb, stream_error, stream_response
from gateway.security.identity import Authenticator
from gateway.security.principal import Principal

log = logging.getLogger(__name__)

FEEDBACK_SERVICE = "infergate.v1.Feedback"
STREAM_IN_FLIGHT = 64  # requests of one ModelStreamInfer stream running at once
TARGET_HEADER = "infergate-target"  # names the route target that served a request
FALLBACK_HEADER = "infergate-fallback"  # names the fallback rule(s) of a degraded answer

# Triton extensions that hold through the gateway (shared memory and tracing control do not).
EXTENSIONS = ("classification", "sequence", "model_configuration", "binary_tensor_data", "parameters", "statistics")


class GrpcFrontend:
    """The servicer; `handler()` is what a grpc.aio server registers. `peer_certs`: the listener
    asks for client certificates, so the verified one names the caller."""

    def __init__(self, dataplane: DataPlane, is_ready: Callable[[], bool], authenticator: Authenticator,
                 peer_certs: bool = False) -> None:
        self.dataplane = dataplane
        self.is_ready = is_ready
        self.authenticator = authenticator
        self.peer_certs = peer_certs

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """Triton's inference service, and infergate's feedback service beside it."""
        return (grpc.method_handlers_generic_handler(SERVICE, {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(_guarded(self.model_infer)),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer),
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelConfig": unary(self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": unary(self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            "RepositoryIndex": unary(self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        }), grpc.method_handlers_generic_handler(FEEDBACK_SERVICE, {
            "PostOutcomes": unary(self.post_outcomes, feedback_pb2.PostOutcomesRequest, feedback_pb2.PostOutcomesResponse),
        }))

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """One request; the trailers name the target that served it and the gateway's span
        (traceparent), on errors too."""
        headers = _Metadata(context)
        trace = Trace.from_headers(headers)  # type: ignore[arg-type]
        span = (TRACEPARENT, trace.traceparent())
        try:
            answer = await self.dataplane.infer(self._call(raw, context, headers, trace))
        except GatewayError as e:
            await _abort(context, e, (span,))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("unexpected error in ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal gateway error", (span,))
        trailers = [(TARGET_HEADER, answer.target), span]
        if answer.fallback:
            trailers.append((FALLBACK_HEADER, answer.fallback))
        context.set_trailing_metadata(tuple(trailers))
        return answer.raw

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Requests on the stream run concurrently (at most STREAM_IN_FLIGHT at once, which keeps
        gRPC's flow control working), except that requests of one sequence (`sequence_id`) run
        in the order sent; answers go back as they finish, errors as in-stream error messages
        carrying the request id, as Triton does. When the client goes away, the requests still
        running are cancelled."""
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        pending: set[asyncio.Task[None]] = set()

        async def one(call: Call, after: asyncio.Task[None] | None) -> None:
            try:
                if after is not None:
                    await asyncio.wait((after,))
                answers.put_nowait(stream_response((await self.dataplane.infer(call)).raw))
            except Exception as e:  # noqa: BLE001 - one bad request must not end the stream
                if not isinstance(e, GatewayError):
                    log.exception("stream request failed")
                message = e.message if isinstance(e, GatewayError) else "internal gateway error"
                answers.put_nowait(stream_error(message, call.request_id))
            finally:
                slots.release()

        async def read_all() -> None:
            sequences: dict[str, asyncio.Task[None]] = {}
            headers = _Metadata(context)
            try:
                async for raw in requests:
                    try:
                        call = self._call(raw, context, headers, Trace.from_headers(headers))  # type: ignore[arg-type]
                    except GatewayError as e:
                        answers.put_nowait(stream_error(e.message, ""))
                        continue
                    await slots.acquire()
                    sequence = parameter_text(call.request, "sequence_id")
                    task = asyncio.create_task(one(call, sequences.get(sequence) if sequence else None))
                    if sequence:
                        sequences[sequence] = task
                        task.add_done_callback(lambda t, s=sequence: sequences.get(s) is t and sequences.pop(s))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.wait(pending)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in pending:
                task.cancel()

    async def post_outcomes(self, request: feedback_pb2.PostOutcomesRequest, context: Any) -> feedback_pb2.PostOutcomesResponse:
        """Outcomes for earlier requests of one model: each item's fate in order."""
        statuses = await self.dataplane.feedback(request.model, outcome_feedback.from_proto(request), self._principal(context))
        return outcome_feedback.to_proto(statuses)

    async def server_live(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=await self.dataplane.model_ready(request.name, request.version, self._principal(context)))

    async def server_metadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="infergate", version=__version__, extensions=EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return await self.dataplane.model_metadata(request.name, request.version, self._principal(context))

    async def model_config(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return await self.dataplane.model_config(request.name, request.version, self._principal(context))

    async def model_statistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        return await self.dataplane.model_statistics(request.name, request.version, self._principal(context))

    async def repository_index(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return await self.dataplane.repository_index(request.ready, self._principal(context))

    def _call(self, raw: bytes, context: grpc.aio.ServicerContext, headers: "_Metadata", trace: Trace) -> Call:
        """The Call for one request; one that cannot be read (malformed, or credentials that do
        not verify) is audited as refused, then answered with its error."""
        request = None
        try:
            request = pb.ModelInferRequest.FromString(raw)
            principal = self._principal(context, headers)
        except (DecodeError, GatewayError) as e:
            error = e if isinstance(e, GatewayError) else InvalidArgument(f"malformed ModelInferRequest: {e}")
            self.dataplane.refused(trace, request.model_name if request else "", "grpc", _client(context.peer()), error,
                                   headers, request.id if request else "")  # type: ignore[arg-type]
            raise error from None
        return Call(request.model_name, request.model_version, request.id, raw, "grpc", _client(context.peer()),
                    headers, request, trace, context.time_remaining(), principal)  # type: ignore[arg-type]

    def _principal(self, context: grpc.aio.ServicerContext, headers: "_Metadata | None" = None) -> Principal | None:
        """The caller: a bearer token in the `authorization` metadata, else the verified client certificate."""
        cert = None
        if self.peer_certs:
            pem = context.auth_context().get("x509_pem_cert")
            cert = pem[0] if pem else None
        authorization = (headers or _Metadata(context)).get("authorization") if self.authenticator.jwt else None
        return self.authenticator.identify(cert, authorization)


class _Metadata:
    """The client's metadata, turned into a dict only if a route asks for a header."""

    __slots__ = ("_context", "_values")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._values: dict[str, str] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        if self._values is None:
            self._values = {k: v for k, v in (self._context.invocation_metadata() or ()) if isinstance(v, str)}
        return self._values.get(key, default)

    def getall(self, key: str, default: Any = None) -> Any:
        """Every value sent under key, in order (tracestate may come in several entries)."""
        values = [v for k, v in (self._context.invocation_metadata() or ()) if k == key and isinstance(v, str)]
        return values or default


def unary(fn: Callable[..., Awaitable[Any]], request_type: type, response_type: type) -> grpc.RpcMethodHandler:
    """A unary method whose handler takes and returns messages; errors answered by `_guarded`."""
    return grpc.unary_unary_rpc_method_handler(
        _guarded(fn), request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString)


def _client(peer: str) -> str:
    """'ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7': the address without the port."""
    return peer.rpartition(":")[0] or peer


async def _abort(context: grpc.aio.ServicerContext, error: GatewayError, trailers: tuple[tuple[str, str], ...] = ()) -> None:
    """End the call with the error's code, message and trailing metadata (and any given)."""
    await context.abort(error.code, error.message, (*((k.lower(), v) for k, v in error.headers().items()), *trailers))


def _guarded(fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answer a GatewayError with its own code and message; anything else is INTERNAL, logged."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except GatewayError as e:
            await _abort(context, e)
        except (asyncio.CancelledError, grpc.aio.AbortError):  # the handler ended the call itself
            raise
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
            await context.abort(grpc.StatusCode.INTERNAL, "internal gateway error")

    return handle


def server(frontend: GrpcFrontend, host: str, port: int, max_message_bytes: int, reuse_port: bool,
           credentials: grpc.ServerCredentials | None = None) -> grpc.aio.Server:
    """A grpc.aio server bound to host:port serving the frontend, over TLS given credentials."""
    srv = grpc.aio.server(options=[
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ])
    srv.add_generic_rpc_handlers(frontend.handlers())
    address = f"{host}:{port}"
    bound = srv.add_secure_port(address, credentials) if credentials else srv.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC listener to {host}:{port}")
    return srv
