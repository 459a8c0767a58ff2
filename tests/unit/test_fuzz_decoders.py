"""Property-based fuzzing of everything that decodes a client's bytes: the HTTP infer codec,
ModelInferRequest parsing followed by check_layout, BYTES splitting and JSON tensor flattening.
Only InvalidArgument (or protobuf's DecodeError for bytes that are no message) may come out, and
whatever is accepted is consistent: an independent numpy check agrees with check_layout.

Budget: fixed and derandomized, so CI runs the same 3,000 examples every time (about 12 s on two
cores): 400 + 300 raw-bytes and arbitrary-JSON bodies, 800 near-valid bodies, 300 + 600 protobuf
requests, 300 + 300 BYTES blobs and JSON tensors. `pytest --hypothesis-show-statistics` reports
the count per test and its outcomes (accepted / refused, as events).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable

import numpy as np
import orjson
from google.protobuf.message import DecodeError
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidArgument
from gateway.protocol.http_codec import decode_request
from gateway.protocol.tensors import DTYPES, ITEMSIZE, MAX_DIM, MAX_RANK, check_layout, json_to_raw, split_bytes
from gateway.protocol.wire import pb

BUDGET = settings(deadline=None, derandomize=True, database=None)
DATATYPES = [*ITEMSIZE, "BYTES"]
ODD_DATATYPES = ["BF17", "fp32", "", "STRING", "INT128"]
DEEP = "\x00deep\x00"  # stands for nesting about as deep as orjson reads (1024) and refuses to write

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
HOSTILE_INTS = st.sampled_from([-1, -(2**63), 2**31, 2**32, 2**32 + 1, 2**62, 2**63 - 1, 2**64 - 1])
HOSTILE_NUMBERS = HOSTILE_INTS | st.sampled_from([True, False, 1.0, 0.5, -0.0, 1e300, "4", None, [4], {"n": 4}, DEEP])


def outcome(step: str, decode: Callable[[], Any], *expected: type[Exception]) -> Any:
    """The decoder's result, None when it refused with one of the expected errors (recorded as an
    event). It runs under Python's stock recursion limit, which Hypothesis raises while a test runs:
    a decoder recursing as deep as a hostile body nests must fail here as it would in a worker."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 1000)
    try:
        result = decode()
    except (InvalidArgument, *expected) as e:
        event(f"{step} refused: {type(e).__name__}")
        return None
    finally:
        sys.setrecursionlimit(limit)
    event(f"{step} accepted")
    return result


def consistent(request: pb.ModelInferRequest) -> bool:
    """check_layout's rules, decided another way: numpy reshapes raw bytes, split_bytes counts BYTES."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        return False
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        known = tensor.datatype in ITEMSIZE or tensor.datatype == "BYTES"
        if not known or len(shape) > MAX_RANK or any(d < 0 or d > MAX_DIM for d in shape):
            return False
        if "shared_memory_region" in tensor.parameters or (raw and tensor.HasField("contents")):
            return False
        count = math.prod(shape)
        if not raw:
            field = _contents_field(tensor.datatype)
            held = len(getattr(tensor.contents, field)) if field in tensor.contents.DESCRIPTOR.fields_by_name else 0
            if held != count:
                return False
        elif tensor.datatype == "BYTES":
            try:
                if len(split_bytes(raw[i])) != count:
                    return False
            except InvalidArgument:
                return False
        else:
            dtype = DTYPES.get(tensor.datatype, np.dtype("<u2"))  # BF16: two bytes an element
            if len(raw[i]) % dtype.itemsize or np.frombuffer(raw[i], dtype).size != count:
                return False
    return True


def _contents_field(datatype: str) -> str:
    """The typed contents field named as Triton names it: integers up to 32 bits share one field."""
    base = datatype.lower()
    if base.startswith(("int", "uint")) and not base.endswith("64"):
        base = base.rstrip("0123456789")
    return f"{base}_contents"


# ---------------------------------------------------------------- (a) arbitrary bytes into the HTTP codec

HEADER_LENGTHS = st.none() | st.text(max_size=24) | st.integers(-(2**70), 2**70).map(str) | st.integers(0, 300).map(str)


@settings(BUDGET, max_examples=400)
@given(body=st.binary(max_size=300), header_length=HEADER_LENGTHS)
def test_any_bytes_into_decode_request(body, header_length):
    decoded = outcome("decode_request", lambda: decode_request(body, header_length, "m", "1"))
    if decoded is not None:
        assert consistent(decoded[0])


@settings(BUDGET, max_examples=300)
@given(doc=JSON, tail=st.binary(max_size=40), cut=st.integers(-3, 3))
def test_any_json_into_decode_request(doc, tail, cut):
    header = orjson.dumps(doc)
    decoded = outcome("decode_request", lambda: decode_request(header + tail, str(len(header) + cut) if tail else None, "m", "1"))
    if decoded is not None:
        assert consistent(decoded[0])


# ---------------------------------------------------------------- (b) near-valid JSON infer bodies

def _elements(datatype: str) -> st.SearchStrategy[Any]:
    if datatype == "BYTES":
        return st.text(max_size=5)
    if datatype == "BOOL":
        return st.booleans()
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        return st.floats(-1e4, 1e4, allow_nan=False) | st.integers(-100, 100)
    info = np.iinfo(DTYPES[datatype])
    return st.integers(int(info.min), int(info.max))


def _raw(draw: st.DrawFn, datatype: str, count: int) -> bytes:
    if datatype == "BYTES":
        return json_to_raw("BYTES", draw(st.lists(st.text(max_size=5), min_size=count, max_size=count)), "x")
    return draw(st.binary(min_size=count * ITEMSIZE[datatype], max_size=count * ITEMSIZE[datatype]))


def _nest(data: list[Any], shape: list[int]) -> list[Any]:
    """Flat row-major data as the nested lists its shape describes."""
    for d in reversed(shape[1:]):
        if d:
            data = [data[i:i + d] for i in range(0, len(data), d)]
    return data


@st.composite
def infer_input(draw: st.DrawFn, i: int) -> tuple[dict[str, Any], bytes | None]:
    """A valid v2 input: JSON data (flat or nested) or a binary section."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    count = math.prod(shape)
    spec: dict[str, Any] = {"name": f"in{i}", "datatype": datatype, "shape": shape}
    if datatype == "BF16" or draw(st.booleans()):
        raw = _raw(draw, datatype, count)
        spec["parameters"] = {"binary_data_size": len(raw)}
        return spec, raw
    data = draw(st.lists(_elements(datatype), min_size=count, max_size=count))
    spec["data"] = _nest(data, shape) if draw(st.booleans()) else data
    return spec, None


def _anywhere(draw: st.DrawFn, node: Any) -> tuple[Any, Any] | None:
    """A random (container, key) inside node, or None when node holds nothing."""
    spot = None
    while isinstance(node, (dict, list)) and node:
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        spot = node, key
        if draw(st.integers(0, 2)) == 0:
            break
        node = node[key]
    return spot


def _input(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any] | None:
    inputs = doc.get("inputs")
    tensors = [t for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
    return draw(st.sampled_from(tensors)) if tensors else None


def mutate(draw: st.DrawFn, doc: dict[str, Any], blobs: list[bytes]) -> None:
    """One hostile change: a node replaced or dropped, a shape, datatype, size or data element count
    lied about, something nested about as deep as the parser allows, the binary sections cut or
    padded, odd outputs, or an input in shared memory."""
    kind = draw(st.sampled_from(["node", "dim", "shape", "datatype", "size", "count", "deep", "blob", "drop", "output",
                                 "shm"]))
    tensor = _input(draw, doc)
    if kind == "node" and (spot := _anywhere(draw, doc)) is not None:
        spot[0][spot[1]] = draw(JSON | HOSTILE_NUMBERS)
    elif kind == "dim" and tensor and isinstance(tensor.get("shape"), list) and tensor["shape"]:
        tensor["shape"][draw(st.integers(0, len(tensor["shape"]) - 1))] = draw(HOSTILE_NUMBERS | st.integers(-3, 5))
    elif kind == "shape" and tensor:
        tensor["shape"] = draw(st.lists(st.integers(-2, 4), max_size=5) | st.lists(st.just(1), min_size=60, max_size=70) | JSON)
    elif kind == "datatype" and tensor:
        tensor["datatype"] = draw(st.sampled_from(DATATYPES + ODD_DATATYPES) | JSON)
    elif kind == "size" and tensor and "parameters" in tensor:
        tensor["parameters"]["binary_data_size"] = draw(HOSTILE_NUMBERS | st.integers(-2, 80))
    elif kind == "count" and tensor and isinstance(tensor.get("data"), list):
        if draw(st.booleans()) or not tensor["data"]:
            tensor["data"].append(draw(JSON))
        else:
            tensor["data"].pop()
    elif kind == "deep" and tensor and draw(st.booleans()):
        tensor["data"] = DEEP
    elif kind == "deep" and (spot := _anywhere(draw, doc)) is not None:
        spot[0][spot[1]] = DEEP
    elif kind == "blob" and blobs:
        i = draw(st.integers(0, len(blobs) - 1))
        blobs[i] = blobs[i][:-1] if blobs[i] and draw(st.booleans()) else blobs[i] + draw(st.binary(min_size=1, max_size=4))
    elif kind == "drop" and (spot := _anywhere(draw, doc)) is not None:
        del spot[0][spot[1]]
    elif kind == "shm" and tensor:
        tensor.setdefault("parameters", {})["shared_memory_region"] = "region0"
        tensor.pop(draw(st.sampled_from(["data", "name"])), None)
    elif kind == "output":
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": st.text(max_size=3) | JSON},
                                                             optional={"parameters": JSON}), max_size=2) | JSON)


@st.composite
def infer_bodies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A v2 infer body and its header length, valid or a few hostile changes away from it."""
    pairs = [draw(infer_input(i)) for i in range(draw(st.integers(0, 3)))]
    blobs = [raw for _, raw in pairs if raw is not None]
    doc: dict[str, Any] = {"inputs": [spec for spec, _ in pairs]}
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=4))
    if draw(st.booleans()):
        doc["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_output", "priority", "sequence_id"]),
                                                 st.booleans() | st.integers(0, 9) | st.text(max_size=3), max_size=2))
    if draw(st.booleans()):
        doc["outputs"] = [{"name": "out0", "parameters": {"binary_data": draw(st.booleans())}}]
    for _ in range(draw(st.integers(0, 2))):
        mutate(draw, doc, blobs)
    header = orjson.dumps(doc)
    if orjson.dumps(DEEP) in header:
        depth, (left, right) = draw(st.integers(990, 1030)), draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        header = header.replace(orjson.dumps(DEEP), left * depth + b"1" + right * depth)
    body = header + b"".join(blobs)
    if draw(st.integers(0, 9)) == 0:  # a lying Inference-Header-Content-Length
        return body, draw(HEADER_LENGTHS | st.integers(0, len(body) + 2).map(str))
    return body, str(len(header)) if blobs or draw(st.booleans()) else None


@settings(BUDGET, max_examples=800)
@given(infer_bodies())
def test_near_valid_bodies_decode_consistently_or_are_refused(case):
    body, header_length = case
    decoded = outcome("decode_request", lambda: decode_request(body, header_length, "m", "1"))
    if decoded is None:
        return
    request, _ = decoded
    check_layout(request)
    assert consistent(request)
    assert pb.ModelInferRequest.FromString(request.SerializeToString()) == request


# ---------------------------------------------------------------- (c) protobuf bytes into check_layout

def check_parsed(raw: bytes) -> None:
    """Parse and check: refusals are DecodeError or InvalidArgument; acceptance agrees with `consistent`."""
    request = outcome("FromString", lambda: pb.ModelInferRequest.FromString(raw), DecodeError)
    if request is not None:
        accepted = outcome("check_layout", lambda: check_layout(request) or True) is not None
        assert accepted == consistent(request)


@settings(BUDGET, max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_into_protobuf_and_check_layout(raw):
    check_parsed(raw)


LIES = ["datatype", "dim", "count", "field", "both", "shm"]
BAD_DIMS = st.sampled_from([-1, MAX_DIM + 1]) | st.integers(-(2**63), 2**63 - 1).filter(lambda d: not 0 <= d <= MAX_DIM)


@st.composite
def protobuf_requests(draw: st.DrawFn) -> bytes:
    """A serialized ModelInferRequest, raw or with typed contents, where one input in three tells
    one lie (datatype, a dimension, its element count, the contents field, raw and typed contents
    both, shared memory), and a few bytes are sometimes overwritten."""
    request = pb.ModelInferRequest(model_name="m")
    raw = draw(st.booleans())
    for i in range(draw(st.integers(0, 3))):
        lie = draw(st.sampled_from(LIES)) if draw(st.integers(0, 2)) == 0 else None
        datatype = draw(st.sampled_from(ODD_DATATYPES if lie == "datatype" else DATATYPES + ["BYTES"] * 4))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        if lie == "dim":  # often beside a zero, which keeps the element count at 0
            at = draw(st.integers(0, len(shape)))
            shape[at:at] = [draw(BAD_DIMS), 0] if draw(st.booleans()) else [draw(BAD_DIMS)]
        tensor = request.inputs.add(name=f"in{i}", datatype=datatype, shape=shape)
        count = math.prod(shape) if 0 <= math.prod(shape) <= 81 else draw(st.integers(0, 4))
        count = max(0, count + draw(st.sampled_from([-1, 1]))) if lie == "count" else count
        if raw:
            request.raw_input_contents.append(_raw(draw, datatype if datatype in DATATYPES else "UINT8", count))
        if not raw or lie == "both":
            fields = tensor.contents.DESCRIPTOR.fields_by_name
            field = _contents_field(datatype)
            if lie == "field" or field not in fields:
                field = draw(st.sampled_from(sorted(fields)))
            values = {"bool_contents": st.booleans(), "bytes_contents": st.binary(max_size=3),
                      "fp32_contents": st.floats(width=32), "fp64_contents": st.floats()}.get(field, st.integers(0, 100))
            getattr(tensor.contents, field).extend(draw(st.lists(values, min_size=count, max_size=count)))
        if lie == "shm":
            tensor.parameters["shared_memory_region"].string_param = "r"
    if raw and draw(st.integers(0, 9)) == 0:
        request.raw_input_contents.append(b"")
    data = bytearray(request.SerializeToString())
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 0, 1, 3]))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(BUDGET, max_examples=600)
@given(protobuf_requests())
def test_structured_protobuf_requests_into_check_layout(raw):
    check_parsed(raw)


# ---------------------------------------------------------------- (d) split_bytes and json_to_raw

@settings(BUDGET, max_examples=300)
@given(st.binary(max_size=64) | st.lists(st.binary(max_size=6), max_size=5).map(lambda xs: json_to_raw(
    "BYTES", [x.decode("latin-1") for x in xs], "x")) | st.binary(min_size=4, max_size=4).map(lambda b: b + b"ab"))
def test_split_bytes_on_any_input(raw):
    elements = outcome("split_bytes", lambda: split_bytes(raw))
    if elements is not None:
        assert b"".join(len(e).to_bytes(4, "little") + e for e in elements) == raw


@settings(BUDGET, max_examples=300)
@given(datatype=st.sampled_from(DATATYPES + ODD_DATATYPES), count=st.none() | st.integers(0, 6), pick=st.data())
def test_json_to_raw_on_any_input(datatype, count, pick):
    typed = st.lists(_elements(datatype), max_size=6) if datatype in DTYPES or datatype == "BYTES" else st.nothing()
    data = pick.draw(typed | typed.map(lambda xs: [xs[:2], xs[2:]]) | JSON | st.lists(JSON_SCALARS, max_size=6))
    raw = outcome("json_to_raw", lambda: json_to_raw(datatype, data, "x", count))
    if raw is None:
        return
    if datatype == "BYTES":
        n = len(split_bytes(raw))
    else:
        n, rest = divmod(len(raw), DTYPES[datatype].itemsize)
        assert rest == 0
    assert count is None or n == count
