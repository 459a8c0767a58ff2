"""v2 datatypes and their numpy forms: raw little-endian bytes, BYTES length-prefixed strings."""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from gateway.errors import InvalidArgument

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}

_LEN = struct.Struct("<I")


_JSON_TYPES: dict[str, tuple[type, ...]] = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}


def json_to_raw(datatype: str, data: Any, name: str) -> bytes:
    """Flatten a JSON "data" list (nested or flat) into the raw bytes Triton expects. Elements
    must be JSON values of the tensor's kind, as Triton requires: strings for BYTES, booleans
    for BOOL, integers for integer types, numbers for floating-point types."""
    values = _flatten(data)
    if datatype == "BYTES":
        _check(values, (str,), name, datatype)
        return b"".join(_LEN.pack(len(b)) + b for b in (x.encode() for x in values))
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"datatype '{datatype}' of input '{name}' cannot be sent as JSON data")
    _check(values, _JSON_TYPES[dtype.kind], name, datatype)
    try:
        return np.asarray(values, dtype=dtype).tobytes()
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"unable to parse 'data' of input '{name}' as {datatype}: {e}") from None


def _check(values: list[Any], allowed: tuple[type, ...], name: str, datatype: str) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            raise InvalidArgument(f"unable to parse 'data' of input '{name}' as {datatype}: element {i} is {v!r}")


def raw_to_json(datatype: str, raw: bytes) -> Any:
    """Raw output bytes as a flat array or list that orjson serialises directly."""
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in split_bytes(raw)]
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"datatype '{datatype}' cannot be returned as JSON data")
    array = np.frombuffer(raw, dtype=dtype)
    return array.tolist() if datatype == "FP16" else array  # orjson has no float16


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    out, i, view = [], 0, memoryview(raw)
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidArgument("BYTES tensor ends inside an element length")
        (n,) = _LEN.unpack_from(raw, i)
        if i + 4 + n > len(raw):
            raise InvalidArgument("BYTES tensor element runs past the end of the tensor")
        out.append(bytes(view[i + 4:i + 4 + n]))
        i += 4 + n
    return out


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else (x,))
    return out
