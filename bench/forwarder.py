"""The thinnest gRPC pass-through in front of Triton: the transport baseline for the gateway.

Every /inference.GRPCInferenceService/* call is forwarded as opaque bytes (no protobuf parsing in
either direction) over one grpc.aio channel; ModelStreamInfer is bridged stream to stream, all
other methods unary to unary. Errors come back with Triton's code and details.

    python bench/forwarder.py --listen 127.0.0.1:9101 --backend 127.0.0.1:8001
"""
from __future__ import annotations

import argparse
import asyncio
import signal
from typing import AsyncIterator

import grpc

SERVICE = "/inference.GRPCInferenceService/"
STREAM_METHODS = {SERVICE + "ModelStreamInfer"}
MAX_MESSAGE = 64 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


class Forwarder(grpc.GenericRpcHandler):
    """Answers any method of the service by calling the same method on the backend channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(SERVICE):
            return None
        if method not in self.handlers:
            self.handlers[method] = self._stream(method) if method in STREAM_METHODS else self._unary(method)
        return self.handlers[method]

    def _unary(self, method: str) -> grpc.RpcMethodHandler:
        call = self.channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return grpc.unary_unary_rpc_method_handler(forward)

    def _stream(self, method: str) -> grpc.RpcMethodHandler:
        call = self.channel.stream_stream(method)

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                async for response in call(requests, timeout=context.time_remaining()):
                    yield response
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return grpc.stream_stream_rpc_method_handler(forward)


async def serve(listen: str, backend: str) -> None:
    """Forward until SIGTERM or SIGINT."""
    channel = grpc.aio.insecure_channel(backend, options=OPTIONS)
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((Forwarder(channel),))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot bind {listen}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9101", help="host:port to serve on")
    parser.add_argument("--backend", default="127.0.0.1:8001", help="Triton's gRPC host:port")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.backend))


if __name__ == "__main__":
    main()
