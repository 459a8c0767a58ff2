"""Triton's protobuf messages and byte-level helpers that avoid re-serialising tensors.

The message classes come from tritonclient, generated from the exact .proto files of the
Triton release it ships with, so the gateway speaks byte-for-byte what Triton speaks.

Protobuf merges a message that appears twice: for a singular field the last value wins. So
renaming a model in a serialized request is an appended field, never a re-encode of its
(possibly megabytes of) tensor bytes.
"""
from __future__ import annotations

from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc", "SERVICE", "override", "varint", "parameter_text", "stream_response", "stream_error"]

SERVICE = "inference.GRPCInferenceService"

_INFER_RESPONSE_TAG = bytes([pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number << 3 | 2])


def override(message_type: type, **fields: str) -> bytes:
    """Bytes that, appended to a serialized message_type, set these string fields (empty: no-op)."""
    return message_type(**{k: v for k, v in fields.items() if v}).SerializeToString()


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def stream_response(infer_response: bytes) -> bytes:
    """A serialized ModelStreamInferResponse wrapping an already serialized ModelInferResponse."""
    return _INFER_RESPONSE_TAG + varint(len(infer_response)) + infer_response


def parameter_text(request: pb.ModelInferRequest | None, name: str) -> str:
    """A request parameter's value as text ("" when absent): sticky keys, sequence ids."""
    if request is None or name not in request.parameters:
        return ""
    p = request.parameters[name]
    return str(getattr(p, p.WhichOneof("parameter_choice") or "string_param"))


def stream_error(message: str, request_id: str) -> bytes:
    """A ModelStreamInferResponse reporting one failed request, as Triton reports it on a stream."""
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request_id)
    ).SerializeToString()
