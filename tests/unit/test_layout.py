"""check_layout: each rule a request's tensors must obey, on both sides of the line."""
from __future__ import annotations

import numpy as np
import pytest

from gateway.errors import InvalidArgument
from gateway.protocol.tensors import MAX_DIM, MAX_RANK, check_layout, json_to_raw
from gateway.protocol.wire import pb


def raw_request(*inputs: tuple[str, list[int], bytes], extra_raw: int = 0) -> pb.ModelInferRequest:
    """A request of (datatype, shape, raw bytes) inputs named x0, x1, ..., as it arrives: parsed from bytes."""
    request = pb.ModelInferRequest(model_name="m")
    for i, (datatype, shape, raw) in enumerate(inputs):
        request.inputs.add(name=f"x{i}", datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    request.raw_input_contents.extend([b""] * extra_raw)
    return pb.ModelInferRequest.FromString(request.SerializeToString())


def typed_request(datatype: str, shape: list[int], field: str, values: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    getattr(request.inputs.add(name="x0", datatype=datatype, shape=shape).contents, field).extend(values)
    return request


FOUR_FP32 = np.ones(4, np.float32).tobytes()


def test_one_raw_entry_per_input():
    check_layout(raw_request(("FP32", [1, 4], FOUR_FP32), ("INT8", [2], b"\x01\x02")))
    with pytest.raises(InvalidArgument, match="3 raw_input_contents for 2 inputs"):
        check_layout(raw_request(("FP32", [1, 4], FOUR_FP32), ("INT8", [2], b"\x01\x02"), extra_raw=1))
    too_few = raw_request(("FP32", [1, 4], FOUR_FP32))
    too_few.inputs.add(name="x1", datatype="INT8", shape=[2])
    with pytest.raises(InvalidArgument, match="1 raw_input_contents for 2 inputs"):
        check_layout(too_few)


@pytest.mark.parametrize("shape, accepted", [
    ([], True), ([0], True), ([0, MAX_DIM], True), ([1] * MAX_RANK, True),
    ([-1], False), ([2, -4], False), ([-(2**63)], False), ([MAX_DIM + 1, 0], False), ([2**63 - 1], False),
    ([1] * (MAX_RANK + 1), False),
])
def test_dimensions_are_non_negative_and_bounded(shape, accepted):
    count = int(np.prod(shape, dtype=object)) if shape else 1
    request = raw_request(("UINT8", shape, b"\x00" * count if count < 2**20 else b""))
    if accepted:
        check_layout(request)
    else:
        with pytest.raises(InvalidArgument, match="input 'x0'.*(negative or huge|dimensions, more than)"):
            check_layout(request)


@pytest.mark.parametrize("datatype, shape, size", [
    ("FP32", [1, 4], 16), ("FP64", [3], 24), ("FP16", [2, 2], 8), ("BF16", [5], 10), ("BOOL", [3], 3),
    ("INT64", [2, 0], 0), ("UINT16", [], 2),
])
def test_fixed_size_bytes_equal_elements_times_itemsize(datatype, shape, size):
    check_layout(raw_request((datatype, shape, b"\x00" * size)))
    for wrong in (size - 1, size + 1):
        if wrong >= 0:
            with pytest.raises(InvalidArgument, match=f"input 'x0' has {wrong} bytes of {datatype}"):
                check_layout(raw_request((datatype, shape, b"\x00" * wrong)))


@pytest.mark.parametrize("raw, shape, problem", [
    (json_to_raw("BYTES", ["a", "bc"], "x0"), [1], "more than 1 BYTES elements"),
    (json_to_raw("BYTES", ["a", "bc"], "x0"), [3], "has 2 BYTES elements"),
    (b"\x01\x00\x00\x00a\x02\x00", [2], "ends inside an element length"),
    (b"\x01\x00\x00\x00a\xff\xff\xff\xff", [2], "runs past the end"),
    (b"", [1], "has 0 BYTES elements"),
])
def test_bytes_blob_splits_into_exactly_the_shape_s_elements(raw, shape, problem):
    check_layout(raw_request(("BYTES", [2], json_to_raw("BYTES", ["a", "bc"], "x0"))))
    check_layout(raw_request(("BYTES", [0], b"")))
    with pytest.raises(InvalidArgument, match=problem):
        check_layout(raw_request(("BYTES", shape, raw)))


@pytest.mark.parametrize("datatype", ["BF17", "fp32", "", "STRING"])
def test_unknown_datatype_is_refused(datatype):
    with pytest.raises(InvalidArgument, match="input 'x0' has unknown datatype"):
        check_layout(raw_request((datatype, [1], b"\x00")))
    with pytest.raises(InvalidArgument, match="unknown datatype"):
        check_layout(typed_request(datatype, [0], "int_contents", []))


@pytest.mark.parametrize("datatype, field, values", [
    ("INT32", "int_contents", [1, 2, 3]), ("BOOL", "bool_contents", [True, False, True]),
    ("UINT64", "uint64_contents", [1, 2, 3]), ("FP32", "fp32_contents", [1.0, 2.0, 3.0]),
    ("BYTES", "bytes_contents", [b"a", b"", b"c"]),
])
def test_typed_contents_hold_the_shape_s_element_count(datatype, field, values):
    check_layout(typed_request(datatype, [3], field, values))
    with pytest.raises(InvalidArgument, match=f"input 'x0' has 2 elements in contents.{field}, its shape \\[3\\] needs 3"):
        check_layout(typed_request(datatype, [3], field, values[:2]))
    with pytest.raises(InvalidArgument, match="has 0 elements"):  # elements in another type's field do not count
        check_layout(typed_request(datatype, [3], "int64_contents" if field != "int64_contents" else "int_contents", [1, 2, 3]))


def test_datatypes_without_a_typed_field_need_raw_bytes():
    check_layout(typed_request("FP16", [0], "fp32_contents", []))
    with pytest.raises(InvalidArgument, match="input 'x0' \\(FP16\\) needs raw_input_contents"):
        check_layout(typed_request("FP16", [2], "fp32_contents", [1.0, 2.0]))


def test_raw_and_typed_contents_do_not_mix():
    request = raw_request(("FP32", [1, 4], FOUR_FP32))
    request.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    with pytest.raises(InvalidArgument, match="input 'x0' has typed 'contents' besides raw_input_contents"):
        check_layout(request)


def test_shared_memory_inputs_are_refused():
    request = raw_request(("FP32", [1, 4], FOUR_FP32))
    check_layout(request)
    request.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    with pytest.raises(InvalidArgument, match="input 'x0' names a shared memory region"):
        check_layout(request)


def test_a_request_without_inputs_passes():
    check_layout(pb.ModelInferRequest(model_name="m"))
