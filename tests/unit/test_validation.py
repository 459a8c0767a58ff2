"""Edge validation: every Triton schema rule and YAML rule both ways, typed contents, BYTES inputs,
malformed layouts, and the per-route Schemas cache (single flight, fallback, retry)."""
from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from gateway.config import Validation
from gateway.errors import InvalidArgument, Unavailable
from gateway.protocol.tensors import DTYPES
from gateway.protocol.wire import pb
from gateway.validation import RETRY_S, Schemas, Violation, compile_validator

DATATYPES = {dtype: name for name, dtype in DTYPES.items()}
NAN, INF = float("nan"), float("inf")


def spec(**rules) -> Validation:
    return Validation.model_validate(rules)


def metadata(**inputs: tuple[str, list[int]]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(name="m", inputs=[pb.ModelMetadataResponse.TensorMetadata(
        name=name, datatype=datatype, shape=shape) for name, (datatype, shape) in inputs.items()])


def config(max_batch_size: int, optional: tuple[str, ...] = ()) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(config=mc.ModelConfig(name="m", max_batch_size=max_batch_size, input=[
        mc.ModelInput(name=name, optional=True) for name in optional]))


# a batching model (max_batch_size 8, TEXT optional) and a non-batching one with a fixed first dim
BATCHING = (metadata(INPUT0=("FP32", [-1, 4]), INPUT1=("INT32", [-1, 2]), TEXT=("BYTES", [-1, 1])), config(8, ("TEXT",)))
FIXED = (metadata(INPUT0=("FP32", [3, -1])), config(0))


def request(typed: bool = False, **inputs: np.ndarray | tuple[str, list[int], bytes]) -> pb.ModelInferRequest:
    """Inputs as arrays (raw bytes, or typed contents when `typed`), or as (datatype, shape, raw bytes)."""
    r = pb.ModelInferRequest(model_name="m")
    for name, value in inputs.items():
        datatype, shape, raw = value if isinstance(value, tuple) else (DATATYPES[value.dtype], list(value.shape), value.tobytes())
        t = r.inputs.add(name=name, datatype=datatype, shape=shape)
        if not typed:
            r.raw_input_contents.append(raw)
        elif datatype == "FP32":
            t.contents.fp32_contents.extend(value.ravel().tolist())
        else:
            t.contents.int_contents.extend(value.ravel().tolist())
    return r


def f32(*rows) -> np.ndarray:
    return np.array(rows, np.float32)


def i32(*rows) -> np.ndarray:
    return np.array(rows, np.int32)


def text(n: int) -> tuple[str, list[int], bytes]:
    return "BYTES", [n, 1], b"\x02\x00\x00\x00hi" * n


def verdict(rules: Validation, schema: tuple, r: pb.ModelInferRequest, raw_size: int = 0) -> tuple | None:
    violation = compile_validator(rules, *schema).check(r, raw_size)
    return None if violation is None else (violation.input, violation.index, violation.rule)


def test_error_names_tensor_element_and_rule():
    error = Violation("INPUT0", (3, 2), "finite", "value nan is not finite").error()
    assert isinstance(error, InvalidArgument)
    assert error.message == "input 'INPUT0' element [3, 2]: value nan is not finite (rule: finite)"
    assert Violation("INPUT0", None, "schema.datatype", "datatype FP64").error().message == \
        "input 'INPUT0': datatype FP64 (rule: schema.datatype)"
    assert Violation("", None, "max_request_bytes", "too big").error().message == "request: too big (rule: max_request_bytes)"


def test_check_reports_the_example_categories_message():
    rules = spec(inputs={"INPUT0": {"features": {1: {"allowed": [1, 2]}}}})
    violation = compile_validator(rules, None, None).check(request(INPUT0=i32([1, 7])), 0)
    assert violation.error().message == "input 'INPUT0' element [0, 1]: 7 is not an allowed category (rule: features[1].allowed)"


GOOD = {"INPUT0": f32([1, 2, 3, 4]), "INPUT1": i32([1, 2])}


@pytest.mark.parametrize("inputs, expected", [
    (GOOD, None),
    ({**GOOD, "TEXT": text(1)}, None),                                        # optional input given
    ({"INPUT0": f32(*[[1, 2, 3, 4]] * 8), "INPUT1": i32(*[[1, 2]] * 8)}, None),  # batch of max_batch_size
    ({**GOOD, "EXTRA": f32([1])}, ("EXTRA", None, "schema.unknown_input")),
    ({"INPUT0": f32([1, 2, 3, 4])}, ("INPUT1", None, "schema.missing_input")),
    ({**GOOD, "INPUT1": np.array([[1, 2]], np.int64)}, ("INPUT1", None, "schema.datatype")),
    ({**GOOD, "TEXT": ("FP32", [1, 1], b"\0" * 4)}, ("TEXT", None, "schema.datatype")),  # BYTES inputs: schema only
    ({**GOOD, "INPUT0": f32(1, 2, 3, 4)}, ("INPUT0", None, "schema.shape")),              # rank
    ({**GOOD, "INPUT0": f32([1, 2, 3])}, ("INPUT0", None, "schema.shape")),               # fixed dim
    ({**GOOD, "INPUT0": f32(*[[1, 2, 3, 4]] * 9), "INPUT1": i32(*[[1, 2]] * 9)}, ("INPUT0", None, "schema.max_batch_size")),
    ({**GOOD, "INPUT0": np.zeros((0, 4), np.float32)}, ("INPUT0", None, "schema.max_batch_size")),
])
def test_schema_of_a_batching_model(inputs, expected):
    assert verdict(spec(), BATCHING, request(**inputs)) == expected


@pytest.mark.parametrize("shape, expected", [
    ((3, 100), None),                             # -1 is free, and no batch limit on a non-batching model
    ((2, 4), ("INPUT0", None, "schema.shape")),   # a fixed first dim
])
def test_schema_of_a_non_batching_model(shape, expected):
    assert verdict(spec(), FIXED, request(INPUT0=np.zeros(shape, np.float32))) == expected


def test_without_config_every_input_is_required_and_batch_unchecked():
    schema = (BATCHING[0], None)
    assert verdict(spec(), schema, request(**GOOD)) == ("TEXT", None, "schema.missing_input")
    many = {"INPUT0": np.zeros((50, 4), np.float32), "INPUT1": np.zeros((50, 2), np.int32), "TEXT": text(50)}
    assert verdict(spec(), schema, request(**many)) is None


@pytest.mark.parametrize("rules, schema", [(spec(schema=False), BATCHING), (spec(), (None, None))])
def test_schema_off_or_unknown_checks_only_the_yaml_rules(rules, schema):
    assert verdict(rules, schema, request(EXTRA=f32([1]), INPUT1=np.zeros(3, np.int64))) is None


def test_schema_violations_come_before_value_violations():
    r = request(INPUT0=f32([NAN, 2, 3, 4]), INPUT1=np.array([[1, 2]], np.int64))
    assert verdict(spec(), BATCHING, r) == ("INPUT1", None, "schema.datatype")


@pytest.mark.parametrize("raw_size, expected", [(100, None), (101, ("", None, "max_request_bytes"))])
def test_max_request_bytes(raw_size, expected):
    assert verdict(spec(max_request_bytes=100), (None, None), request(**GOOD), raw_size) == expected


@pytest.mark.parametrize("schema", [(None, None), (metadata(INPUT0=("FP32", [-1, 4]), INPUT1=("INT32", [-1])), config(0))])
@pytest.mark.parametrize("rows, expected", [(3, None), (4, ("INPUT1", None, "max_batch"))])
def test_max_batch_applies_to_every_inputs_first_dim(schema, rows, expected):
    r = request(INPUT0=np.zeros((2, 4), np.float32), INPUT1=np.zeros(rows, np.int32))
    assert verdict(spec(max_batch=3), schema, r) == expected


@pytest.mark.parametrize("rules, value, expected", [
    ({}, 1.5, None),
    ({}, NAN, ("INPUT0", (1, 2), "finite")),                          # finite by default
    ({}, -INF, ("INPUT0", (1, 2), "finite")),
    ({"finite": False}, INF, None),
    ({"finite": False, "inputs": {"INPUT0": {"finite": True}}}, NAN, ("INPUT0", (1, 2), "finite")),
    ({"inputs": {"INPUT0": {"finite": False}}}, NAN, None),
    ({"inputs": {"OTHER": {"finite": False}}}, NAN, ("INPUT0", (1, 2), "finite")),  # the route's default still holds
    ({"inputs": {"INPUT0": {"min": 0, "max": 2}}}, 2.0, None),
    ({"inputs": {"INPUT0": {"min": 0, "max": 2}}}, -0.5, ("INPUT0", (1, 2), "min")),
    ({"inputs": {"INPUT0": {"min": 0, "max": 2}}}, 2.5, ("INPUT0", (1, 2), "max")),
    ({"finite": False, "inputs": {"INPUT0": {"min": 0}}}, NAN, ("INPUT0", (1, 2), "min")),  # NaN is in no range
    ({"inputs": {"INPUT0": {"allowed": [0, 1, 2.5]}}}, 2.5, None),
    ({"inputs": {"INPUT0": {"allowed": [0, 1, 2.5]}}}, 2.0, ("INPUT0", (1, 2), "allowed")),
])
@pytest.mark.parametrize("typed", [False, True])
def test_tensor_value_rules(rules, value, expected, typed):
    a = np.zeros((2, 4), np.float32)
    a[1, 2] = value
    assert verdict(spec(**rules), (None, None), request(typed, INPUT0=a)) == expected


@pytest.mark.parametrize("value, expected", [
    (5, None),
    (-1, ("INPUT1", (1, 0), "min")),
    (7, ("INPUT1", (1, 0), "allowed")),
])
def test_integer_tensors_skip_finite_and_keep_value_rules(value, expected):
    rules = spec(inputs={"INPUT1": {"min": 0, "allowed": [0, 5, 9]}})
    for typed in (False, True):
        assert verdict(rules, BATCHING, request(typed, INPUT0=f32([1, 2, 3, 4], [1, 2, 3, 4]), INPUT1=i32([0, 9], [value, 5]))) == expected


FEATURES = {"features": {0: {"min": 0, "max": 10}, 2: {"min": -1, "allowed": [1, 2, 3]}, 3: {"max": 0.5}}}


@pytest.mark.parametrize("row, expected", [
    ([10, 99, 3, 0.5], None),                                         # column 1 has no rule
    ([-1, 0, 1, 0], ("INPUT0", (1, 0), "features[0].min")),
    ([11, 0, 1, 0], ("INPUT0", (1, 0), "features[0].max")),
    ([5, 0, -2, 0], ("INPUT0", (1, 2), "features[2].min")),
    ([5, 0, 4, 0], ("INPUT0", (1, 2), "features[2].allowed")),
    ([5, 0, 2, 0.75], ("INPUT0", (1, 3), "features[3].max")),
])
def test_feature_rules_on_columns_of_the_last_axis(row, expected):
    a = f32([0, 0, 1, 0], row)
    assert verdict(spec(inputs={"INPUT0": FEATURES}), BATCHING, request(INPUT0=a, INPUT1=i32([1, 2], [1, 2]))) == expected


def test_feature_rules_on_a_higher_rank_tensor_report_the_full_index():
    a = np.zeros((2, 3, 4), np.float32)
    a[1, 2, 3] = 9
    assert verdict(spec(inputs={"INPUT0": FEATURES}), (None, None), request(INPUT0=a)) == ("INPUT0", (1, 2, 3), "features[3].max")


@pytest.mark.parametrize("shape, expected", [
    ((2, 4), None),
    ((2, 3), ("INPUT0", None, "features[3]")),
    ((), ("INPUT0", None, "features[0]")),
])
def test_a_feature_column_past_the_last_axis_is_a_violation(shape, expected):
    rules = spec(inputs={"INPUT0": {"features": {0: {"min": 0}, 3: {"max": 5}}}})
    violation = compile_validator(rules, None, None).check(request(INPUT0=np.zeros(shape, np.float32)), 0)
    assert (None if violation is None else (violation.input, violation.index, violation.rule)) == expected
    if violation is not None:
        assert "has no column" in violation.message


def test_bounds_compare_at_the_tensors_precision():
    rules = spec(inputs={"INPUT0": {"max": 0.1, "allowed": [0.1, 0.3]}, "HALF": {"min": -70000, "max": 70000}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verdict(rules, (None, None), request(INPUT0=f32([0.1, 0.1]), HALF=np.array([1, 65504], np.float16))) is None


def test_bytes_inputs_skip_value_rules():
    rules = spec(inputs={"TEXT": {"min": 5, "features": {3: {"max": 0}}}})
    assert verdict(rules, BATCHING, request(**GOOD, TEXT=text(1))) is None


def test_a_rule_for_an_input_the_request_lacks_is_no_violation():
    assert verdict(spec(inputs={"ABSENT": {"min": 0}}), (None, None), request(INPUT0=f32([1]))) is None


@pytest.mark.parametrize("value, expected", [
    (("FP32", [2, 2], b"\0" * 12), ("INPUT0", None, "schema.byte_size")),     # raw bytes short of the shape
    (("FP32", [-2, -2], b"\0" * 16), ("INPUT0", None, "schema.shape")),        # negative dims
])
def test_malformed_layouts_are_violations_not_crashes(value, expected):
    assert verdict(spec(), (None, None), request(INPUT0=value)) == expected


def test_missing_raw_contents_and_short_typed_contents_are_violations():
    r = request(INPUT0=f32([1]))
    r.inputs.add(name="INPUT1", datatype="FP32", shape=[1])  # raw_input_contents has one entry for two inputs
    assert verdict(spec(), (None, None), r) == ("INPUT1", None, "schema.byte_size")
    r = request(True, INPUT0=f32([1, 2]))
    r.inputs[0].shape[:] = [3]
    assert verdict(spec(), (None, None), r) == ("INPUT0", None, "schema.byte_size")


# ---------------------------------------------------------------- Schemas


class FakeBackend:
    """Answers ModelMetadata and ModelConfig after `gate` opens, or fails while `down`."""

    def __init__(self, schema: tuple = BATCHING) -> None:
        self.schema = schema
        self.calls: list[tuple[str, str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False

    async def cached(self, method: str, model: str, version: str):
        self.calls.append((method, model, version))
        await self.gate.wait()
        if self.down:
            raise Unavailable("triton is down")
        return self.schema[0] if method == "ModelMetadata" else self.schema[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


UNKNOWN = request(**GOOD, EXTRA=f32([1]))


async def test_concurrent_first_calls_share_one_fetch_and_later_calls_reuse_it():
    backend, schemas = FakeBackend(), Schemas(spec())
    backend.gate.clear()
    waiters = [asyncio.ensure_future(schemas.validator(backend, "m", "1")) for _ in range(10)]
    await asyncio.sleep(0)
    assert schemas.ready(backend, "m", "1") is None
    backend.gate.set()
    validators = await asyncio.gather(*waiters)
    assert sorted(backend.calls) == [("ModelConfig", "m", "1"), ("ModelMetadata", "m", "1")]
    assert all(v is validators[0] for v in validators)
    assert schemas.ready(backend, "m", "1") is validators[0] and await schemas.validator(backend, "m", "1") is validators[0]
    assert validators[0].check(UNKNOWN, 0).rule == "schema.unknown_input"
    assert len(backend.calls) == 2


async def test_each_backend_model_and_version_compiles_separately():
    first, second, schemas = FakeBackend(), FakeBackend(FIXED), Schemas(spec())
    a = await schemas.validator(first, "m", "1")
    assert await schemas.validator(first, "m", "2") is not a
    assert await schemas.validator(first, "n", "1") is not a
    assert await schemas.validator(second, "m", "1") is not a
    assert len(first.calls) == 6 and len(second.calls) == 2


async def test_a_cancelled_first_caller_leaves_the_fetch_to_the_others():
    backend, schemas = FakeBackend(), Schemas(spec())
    backend.gate.clear()
    first = asyncio.ensure_future(schemas.validator(backend, "m", ""))
    second = asyncio.ensure_future(schemas.validator(backend, "m", ""))
    await asyncio.sleep(0)
    first.cancel()
    backend.gate.set()
    assert (await second).check(UNKNOWN, 0).rule == "schema.unknown_input"
    assert len(backend.calls) == 2


async def test_a_failed_fetch_falls_back_to_yaml_rules_and_retries_after_the_pause():
    clock, backend = Clock(), FakeBackend()
    schemas = Schemas(spec(inputs={"INPUT0": {"max": 5}}), clock=clock)
    backend.down = True
    fallback = await schemas.validator(backend, "m", "")
    assert fallback.check(UNKNOWN, 0) is None                                      # no schema known
    assert fallback.check(request(INPUT0=f32([9])), 0).rule == "max"              # YAML rules still hold
    backend.down = False
    clock.now += RETRY_S - 0.01
    assert schemas.ready(backend, "m", "") is fallback and await schemas.validator(backend, "m", "") is fallback
    assert len(backend.calls) == 2
    clock.now += 0.01
    assert schemas.ready(backend, "m", "") is None
    compiled = await schemas.validator(backend, "m", "")
    assert compiled.check(UNKNOWN, 0).rule == "schema.unknown_input" and len(backend.calls) == 4
    assert schemas.ready(backend, "m", "") is compiled


async def test_with_schema_off_nothing_is_fetched():
    backend, schemas = FakeBackend(), Schemas(spec(schema=False, max_batch=1))
    validator = schemas.ready(backend, "m", "")
    assert validator is not None and await schemas.validator(backend, "m", "") is validator
    assert validator.check(UNKNOWN, 0) is None and backend.calls == []
