"""ModelInfer requests multiplexed over a few long-lived ModelStreamInfer streams.

A unary gRPC call pays for a new HTTP/2 stream, headers and status per request; here each
request is one message on a stream that stays open. Requests are tagged with a gateway id
(an appended `id` field), answers are matched back by it and given the caller's id again.

Triton reports a failed request on a stream as an error string without a status code, so a
failed request is asked once more over a unary call, which answers with Triton's own code
and message. Only failures pay for that; they happen before execution for every request
Triton rejects, and a request whose execution failed produced nothing.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Awaitable, Callable

import grpc

from gateway.errors import DeadlineExceeded, Unavailable
from gateway.protocol.wire import SERVICE, override, pb, varint

log = logging.getLogger(__name__)

_STREAM = f"/{SERVICE}/ModelStreamInfer"
_ID_FIELD = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["id"].number
_ERROR_FIELD = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["error_message"].number
_RESPONSE_FIELD = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number

Unary = Callable[[bytes, float], Awaitable[bytes]]


class StreamPool:
    """`infer` has the unary signature; `fallback` is the unary path used to explain failures."""

    def __init__(self, channels: list[grpc.aio.Channel], streams: int, fallback: Unary) -> None:
        self._open = [ch.stream_stream(_STREAM, request_serializer=None, response_deserializer=None)
                      for ch in channels]
        self._streams: list[_Stream | None] = [None] * streams
        self._turn = itertools.cycle(range(streams)).__next__
        self._ids = itertools.count()
        self._fallback = fallback

    async def infer(self, payload: bytes, timeout: float, request_id: str) -> bytes:
        i = self._turn()
        stream = self._streams[i]
        if stream is None or stream.closed:
            stream = self._streams[i] = _Stream(self._open[i % len(self._open)]())
        key = f"ig{next(self._ids)}"
        future = stream.send(key, payload + override(pb.ModelInferRequest, id=key))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                answer = await future
        except TimeoutError:
            raise DeadlineExceeded("Deadline Exceeded") from None
        finally:
            stream.pending.pop(key, None)
        if answer is None:  # Triton refused it: ask again over unary for the exact code and message
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded("Deadline Exceeded")
            return await self._fallback(payload, remaining)
        return _with_id(answer, request_id)

    async def close(self) -> None:
        for stream in self._streams:
            if stream is not None:
                stream.close()


class _Stream:
    """One open ModelStreamInfer call with a writer task (writes never overlap and a cancelled
    caller cannot cancel the shared call) and a reader task that resolves futures by id."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.pending: dict[str, asyncio.Future[memoryview | None]] = {}
        self.closed = False
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._tasks = (loop.create_task(self._write()), loop.create_task(self._read()))

    def send(self, key: str, message: bytes) -> asyncio.Future[memoryview | None]:
        future: asyncio.Future[memoryview | None] = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        self._outbox.put_nowait(message)
        return future

    async def _write(self) -> None:
        try:
            while True:
                await self.call.write(await self._outbox.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            self._fail(e)

    async def _read(self) -> None:
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                key, answer = _split(memoryview(message))
                future = self.pending.get(key)
                if future is not None and not future.done():
                    future.set_result(answer)
            self._fail(None)
        except grpc.aio.AioRpcError as e:
            self._fail(e)

    def _fail(self, error: BaseException | None) -> None:
        self.close()
        reason = f"backend stream closed: {error.details() if isinstance(error, grpc.aio.AioRpcError) else error}"
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable(reason))
        self.pending.clear()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.call.cancel()
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):  # type: ignore[no-untyped-def]
    """(field number, start, end) of each length-delimited field; other wire types skipped."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == 2:
            n, i = _varint(buf, i)
            yield tag >> 3, i, i + n
            i += n
        elif wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _split(message: memoryview) -> tuple[str, memoryview | None]:
    """(gateway id, serialized ModelInferResponse or None when Triton reported an error)."""
    failed = False
    response = message[:0]
    for number, start, end in _fields(message):
        if number == _ERROR_FIELD:
            failed = True
        elif number == _RESPONSE_FIELD:
            response = message[start:end]
    for number, start, end in _fields(response):
        if number == _ID_FIELD:
            return bytes(response[start:end]).decode(), None if failed else response
    return "", None


def _with_id(response: memoryview, request_id: str) -> bytes:
    """The response with the gateway's id replaced by the caller's (absent when it sent none)."""
    for number, start, end in _fields(response):
        if number == _ID_FIELD:
            head = start - 1 - len(varint(end - start))
            return b"".join((response[:head], override(pb.ModelInferResponse, id=request_id), response[end:]))
    return bytes(response)

