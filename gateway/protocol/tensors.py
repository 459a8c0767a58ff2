"""v2 datatypes and their numpy forms: raw little-endian bytes, BYTES length-prefixed strings;
and the layout rules a tensor's bytes must obey before anything reads them."""
from __future__ import annotations

import struct
from typing import Any, Collection, Iterator

import numpy as np

from gateway.errors import InvalidArgument
from gateway.protocol.wire import pb

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
# Bytes per element of every fixed-size v2 datatype; BF16 has no numpy form but travels as raw bytes.
ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()} | {"BF16": 2}
# The InferTensorContents field that carries each datatype's typed elements (FP16 and BF16 have none).
CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
MAX_RANK = 64        # numpy's own limit; the gateway's fallback and shadow code reshape to the shape
MAX_DIM = 2**32      # no message (gRPC's are < 2 GiB) carries a longer axis, even of BOOL
_SHARED_MEMORY = "shared_memory_region"

_LEN = struct.Struct("<I")


_JSON_TYPES: dict[str, tuple[type, ...]] = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}


def check_layout(request: pb.ModelInferRequest) -> None:
    """Refuse a request whose tensor bytes disagree with its shapes, before Triton or the gateway's
    own numpy views read them: one raw entry per input, each exactly the bytes its shape needs,
    else typed `contents` with exactly the elements its shape needs. Reads lengths, copies nothing
    of its own (protobuf hands out each raw entry as a fresh bytes object)."""
    raw = request.raw_input_contents
    inputs = request.inputs[:]  # upb containers: a slice is a quick list, iterating one is slow
    if raw and len(raw) != len(inputs):
        raise InvalidArgument(f"request has {len(raw)} raw_input_contents for {len(inputs)} inputs")
    for i, tensor in enumerate(inputs):
        name = tensor.name
        refuse_shared_memory(tensor.parameters, name)
        shape = tensor.shape[:]
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input '{name}' has typed 'contents' besides raw_input_contents")
            check_tensor(name, tensor.datatype, shape, raw[i])
            continue
        count = check_tensor(name, tensor.datatype, shape, None)
        field = CONTENTS.get(tensor.datatype)
        held = len(getattr(tensor.contents, field)) if field else 0
        if held != count:
            raise InvalidArgument(f"input '{name}' has {held} elements in contents.{field}, its shape {shape} needs {count}"
                                  if field else f"input '{name}' ({tensor.datatype}) needs raw_input_contents")


def check_tensor(name: str, datatype: str, shape: Collection[int], raw: bytes | memoryview | None) -> int:
    """The element count `shape` declares, after refusing an unknown datatype, an absurd shape and
    (when given) raw bytes that do not hold exactly that many elements. Python ints: no allocation."""
    itemsize = ITEMSIZE.get(datatype)
    if itemsize is None and datatype != "BYTES":
        raise InvalidArgument(f"input '{name}' has unknown datatype {brief(datatype)}")
    count = element_count(shape, name)
    if raw is None:
        return count
    if itemsize is not None:
        if len(raw) != count * itemsize:
            raise InvalidArgument(f"input '{name}' has {len(raw)} bytes of {datatype}, its shape {list(shape)} "
                                  f"needs {count} x {itemsize} = {count * itemsize}")
        return count
    held = 0
    for _ in _spans(raw, f"BYTES input '{name}'"):  # stops one past `count`: work is bounded by both
        held += 1
        if held > count:
            break
    if held != count:
        raise InvalidArgument(f"input '{name}' has {'more than ' if held > count else ''}{min(held, count)} BYTES elements, "
                              f"its shape {list(shape)} needs {count}")
    return count


def element_count(shape: Collection[int], name: str) -> int:
    """prod(shape) as a Python int, refusing more than MAX_RANK dimensions or one outside 0..MAX_DIM
    (protobuf's int64 shapes can be negative)."""
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"shape of input '{name}' has {len(shape)} dimensions, more than {MAX_RANK}")
    count = 1
    for d in shape:
        if not 0 <= d <= MAX_DIM:
            raise InvalidArgument(f"shape of input '{name}' has a negative or huge dimension: {d}")
        count *= d
    return count


def refuse_shared_memory(parameters: Collection[str], name: str) -> None:
    """Shared-memory regions are registered with Triton, not the gateway: an input naming one is refused."""
    if _SHARED_MEMORY in parameters:
        raise InvalidArgument(f"input '{name}' names a shared memory region; shared memory does not work through the gateway")


def json_to_raw(datatype: str, data: Any, name: str, count: int | None = None) -> bytes:
    """Flatten a JSON "data" list (nested or flat) into the raw bytes Triton expects. Elements
    must be JSON values of the tensor's kind, as Triton requires: strings for BYTES, booleans
    for BOOL, integers for integer types, numbers for floating-point types; and there must be
    `count` of them (the shape's), checked before any tensor is built."""
    values = _flatten(data)
    if count is not None and len(values) != count:
        raise InvalidArgument(f"input '{name}' has {len(values)} elements in 'data', its shape needs {count}")
    if datatype == "BYTES":
        _check(values, (str,), name, datatype)
        return b"".join(_LEN.pack(len(b)) + b for b in (x.encode() for x in values))
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"datatype {brief(datatype)} of input '{name}' cannot be sent as JSON data")
    _check(values, _JSON_TYPES[dtype.kind], name, datatype)
    try:
        return np.asarray(values, dtype=dtype).tobytes()
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"unable to parse 'data' of input '{name}' as {datatype}: {e}") from None


def _check(values: list[Any], allowed: tuple[type, ...], name: str, datatype: str) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            raise InvalidArgument(f"unable to parse 'data' of input '{name}' as {datatype}: element {i} is {brief(v)}")


def brief(value: Any) -> str:
    """A client's value for an error message: containers by kind only (a hostile one can be deep
    enough to break repr), anything else cut short."""
    if isinstance(value, (dict, list)):
        return "a JSON object" if isinstance(value, dict) else "a JSON array"
    text = repr(value[:41] if isinstance(value, str) else value)
    return text if len(text) <= 42 else text[:40] + "…"


def raw_to_json(datatype: str, raw: bytes) -> Any:
    """Raw output bytes as a flat array or list that orjson serialises directly."""
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in split_bytes(raw)]
    if datatype == "BF16":  # the upper half of a float32: widen it
        return (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"datatype '{datatype}' cannot be returned as JSON data")
    array = np.frombuffer(raw, dtype=dtype)
    return array.tolist() if datatype == "FP16" else array  # orjson has no float16


def views(specs: Any, raw: Any, wanted: Collection[str]) -> dict[str, np.ndarray]:
    """name -> zero-copy array view of each wanted raw tensor numpy can read (check_layout has
    matched raw entries to shapes). Tensors sent as typed `contents` instead of raw bytes are skipped."""
    out: dict[str, np.ndarray] = {}
    if not raw:
        return out
    for i, spec in enumerate(specs[:]):  # upb containers: a slice is a quick list, iterating one is slow
        name = spec.name
        dtype = DTYPES.get(spec.datatype) if name in wanted else None
        if dtype is not None:
            out[name] = np.frombuffer(raw[i], dtype).reshape(spec.shape[:])
    return out


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    view = memoryview(raw)
    return [bytes(view[start:end]) for start, end in _spans(raw, "BYTES tensor")]


def _spans(raw: bytes | memoryview, what: str) -> Iterator[tuple[int, int]]:
    """Where each element of a BYTES tensor starts and ends, walking the length prefixes."""
    i, size = 0, len(raw)
    while i < size:
        if i + 4 > size:
            raise InvalidArgument(f"{what} ends inside an element length")
        (n,) = _LEN.unpack_from(raw, i)
        i += 4
        if i + n > size:
            raise InvalidArgument(f"an element of {what} runs past the end of the tensor")
        yield i, i + n
        i += n


def _flatten(data: Any) -> list[Any]:
    """Nested lists' leaves in order, without recursion: a hostile body nests as deep as the JSON parser allows."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack: list[Iterator[Any]] = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out
