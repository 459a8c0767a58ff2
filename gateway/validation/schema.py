"""Edge checks: Triton's input schema plus a route's YAML value rules, compiled once per target and
run per request as vectorized numpy over views of the tensor bytes.

Value rules (finite, min, max, allowed, features) skip BYTES tensors and datatypes numpy cannot
view (BF16): their elements are not numbers. A NaN fails min, max and allowed (it compares false
with everything) whatever `finite` says. Bounds compare in a floating tensor's own precision, so
`max: 0.1` admits an FP32 0.1.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from gateway.config import Bounds, InputRule, Validation
from gateway.errors import GatewayError, InvalidArgument
from gateway.protocol.tensors import CONTENTS, DTYPES
from gateway.protocol.wire import pb

log = logging.getLogger(__name__)

RETRY_S = 5.0  # after a failed metadata fetch, the YAML rules alone apply for this long

_FLOATS = [np.dtype(t) for t in ("<f2", "<f4", "<f8")]


@dataclass(frozen=True, slots=True)
class Violation:
    """The first rule a request breaks: the input ("" for the whole request), the element, why."""

    input: str
    index: tuple[int, ...] | None
    rule: str
    message: str

    def error(self) -> InvalidArgument:
        """The client's error, naming the tensor, the element and the rule."""
        where = f"input '{self.input}'" if self.input else "request"
        if self.index is not None:
            where += f" element {list(self.index)}"
        return InvalidArgument(f"{where}: {self.message} (rule: {self.rule})")


@dataclass(frozen=True, slots=True)
class _Check:
    """One value rule over the whole tensor, or over `columns` of its last axis gathered by `take`:
    `test` maps the values to a mask that is True where they pass."""

    rules: tuple[str, ...]             # the rule's name, one per gathered column
    columns: tuple[int, ...] | None
    take: slice | np.ndarray | None
    test: Callable[[np.ndarray], np.ndarray]
    say: Callable[[Any, int], str]     # why a value (in gathered column j) fails
    floating: bool = False             # for floating-point tensors only

    def find(self, name: str, a: np.ndarray) -> Violation | None:
        """The first failing element, searched for only when the mask is not all True."""
        if self.floating and a.dtype.kind != "f":
            return None
        view = a if self.take is None else a[..., self.take]
        ok = self.test(view)
        if ok.all():
            return None
        index = tuple(int(i) for i in np.unravel_index(int(np.argmin(ok)), ok.shape))
        value, j = view[index], 0
        if self.columns is not None:
            j = index[-1]
            index = index[:-1] + (self.columns[j],)
        return Violation(name, index, self.rules[j], self.say(value, j))


@dataclass(frozen=True, slots=True)
class _Values:
    """An input's value rules and the last-axis columns they need (sorted)."""

    columns: tuple[int, ...]
    checks: tuple[_Check, ...]


@dataclass(frozen=True, slots=True)
class _Tensor:
    """An input as Triton describes it: -1 dims are free; `batch` > 0 bounds a batch first dim."""

    datatype: str
    shape: tuple[int, ...]
    fixed: tuple[tuple[int, int], ...]
    batch: int


def _per_dtype(values: list[int | float] | float) -> Callable[[np.dtype], np.ndarray]:
    """An operand for each tensor dtype: cast to a floating tensor's own precision, else as given."""
    wide = np.asarray(values)
    wide = wide if wide.dtype.kind in "iuf" else wide.astype(np.float64)  # integers stay exact for np.isin
    with np.errstate(over="ignore"):  # past FP16's range is infinity, which compares right
        narrow = {dt: wide.astype(dt) for dt in _FLOATS}
    return lambda dt: narrow.get(dt, wide)


def _rule(kind: str, bound: Any, columns: tuple[int, ...] | None = None) -> _Check:
    """A min, max or allowed check on the whole tensor, or on last-axis `columns` (a bound each for
    min and max, gathered in one pass; one column for allowed)."""
    operand = _per_dtype(sorted(bound) if kind == "allowed" else bound)
    if columns is None:
        rules, take, limits = (kind,), None, [bound]
    else:
        rules, limits = tuple(f"features[{c}].{kind}" for c in columns), bound
        take = slice(columns[0], columns[0] + 1) if len(columns) == 1 else np.array(columns)
    if kind == "allowed":
        return _Check(rules, columns, take, lambda v: np.isin(v, operand(v.dtype)),
                      lambda x, j: f"{x} is not an allowed category")
    op, word = (np.greater_equal, "below") if kind == "min" else (np.less_equal, "above")
    return _Check(rules, columns, take, lambda v: op(v, operand(v.dtype)),
                  lambda x, j: f"value {x} is {word} {kind} {limits[j]:g}")


def _values(rule: InputRule | None, finite: bool) -> _Values:
    """Compile one input's rules, in the order they are checked."""
    checks = [_Check(("finite",), None, None, np.isfinite, lambda x, j: f"value {x} is not finite",
                      floating=True)] if finite else []
    if rule is None:
        return _Values((), tuple(checks))
    features: list[tuple[int, Bounds]] = sorted(rule.features.items())
    for kind in ("min", "max", "allowed"):
        if getattr(rule, kind) is not None:
            checks.append(_rule(kind, getattr(rule, kind)))
    for kind in ("min", "max"):
        cols = [(c, getattr(b, kind)) for c, b in features if getattr(b, kind) is not None]
        if cols:
            checks.append(_rule(kind, [x for _, x in cols], tuple(c for c, _ in cols)))
    checks += [_rule("allowed", b.allowed, (c,)) for c, b in features if b.allowed is not None]
    return _Values(tuple(c for c, _ in features), tuple(checks))


@dataclass(frozen=True, slots=True)
class Validator:
    """A target's compiled checks; `tensors` is None when Triton's schema is unknown or not checked."""

    max_request_bytes: int | None
    max_batch: int | None
    tensors: dict[str, _Tensor] | None
    required: tuple[str, ...]
    values: dict[str, _Values]
    default: _Values

    def check(self, request: pb.ModelInferRequest, raw_size: int) -> Violation | None:
        """The first rule the request breaks, or None: its size, each input's schema, missing
        inputs, then each input's values."""
        if self.max_request_bytes is not None and raw_size > self.max_request_bytes:
            return Violation("", None, "max_request_bytes",
                             f"{raw_size} bytes is over max_request_bytes {self.max_request_bytes}")
        inputs = list(request.inputs)
        shapes = [tuple(t.shape) for t in inputs]
        for t, shape in zip(inputs, shapes):
            if violation := self._schema(t, shape):
                return violation
        if self.required:
            names = {t.name for t in inputs}
            for name in self.required:
                if name not in names:
                    return Violation(name, None, "schema.missing_input", "required input is missing")
        raw = request.raw_input_contents
        for i, (t, shape) in enumerate(zip(inputs, shapes)):
            rules = self.values.get(t.name, self.default)
            dtype = DTYPES.get(t.datatype)
            if not rules.checks or dtype is None:
                continue
            a = _read(t, (raw[i] if i < len(raw) else b"") if raw else None, dtype, shape)
            if isinstance(a, Violation):
                return a
            if rules.columns and (a.ndim == 0 or rules.columns[-1] >= a.shape[-1]):
                width = a.shape[-1] if a.ndim else 0
                col = next(c for c in rules.columns if c >= width)
                return Violation(t.name, None, f"features[{col}]", f"has no column {col}: its last axis has {width}")
            for check in rules.checks:
                if violation := check.find(t.name, a):
                    return violation
        return None

    def _schema(self, t: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...]) -> Violation | None:
        """Name, datatype, shape and batch size against Triton's, then the YAML max_batch."""
        if self.tensors is not None:
            expected = self.tensors.get(t.name)
            if expected is None:
                return Violation(t.name, None, "schema.unknown_input",
                                 f"the model has no such input (inputs: {', '.join(self.tensors)})")
            if t.datatype != expected.datatype:
                return Violation(t.name, None, "schema.datatype", f"datatype {t.datatype}, the model expects {expected.datatype}")
            if len(shape) != len(expected.shape) or any(shape[i] != d for i, d in expected.fixed):
                return Violation(t.name, None, "schema.shape", f"shape {list(shape)}, the model expects {list(expected.shape)}")
            if expected.batch and not 1 <= shape[0] <= expected.batch:
                return Violation(t.name, None, "schema.max_batch_size",
                                 f"batch size {shape[0]} is outside 1..{expected.batch} (the model's max_batch_size)")
        if self.max_batch is not None and shape and shape[0] > self.max_batch:
            return Violation(t.name, None, "max_batch", f"batch size {shape[0]} is over max_batch {self.max_batch}")
        return None


def _read(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, dtype: np.dtype,
          shape: tuple[int, ...]) -> np.ndarray | Violation:
    """The tensor as an array: a view on its raw bytes, or built from typed contents when raw is None."""
    if any(d < 0 for d in shape):
        return Violation(t.name, None, "schema.shape", f"shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            return Violation(t.name, None, "schema.byte_size",
                             f"{len(raw)} bytes of data, shape {list(shape)} of {t.datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype).reshape(shape)
    field = CONTENTS.get(t.datatype)
    values = getattr(t.contents, field) if field else ()
    if len(values) != count:
        return Violation(t.name, None, "schema.byte_size",
                         f"{len(values)} values in contents, shape {list(shape)} needs {count}")
    # floats in the tensor's own precision (bounds compare in it); integers and booleans as numpy
    # reads the wider values contents carry (an INT8 input travels as int32s)
    return np.array(values, dtype if dtype.kind == "f" else None).reshape(shape)


def compile_validator(spec: Validation, metadata: pb.ModelMetadataResponse | None,
                      model_config: pb.ModelConfigResponse | None) -> Validator:
    """Precompute a target's checks; without metadata (Triton not reachable yet) only the YAML rules."""
    tensors: dict[str, _Tensor] | None = None
    required: tuple[str, ...] = ()
    if spec.schema_ and metadata is not None:
        config = model_config.config if model_config is not None else None
        batch = config.max_batch_size if config is not None else 0
        optional = {i.name for i in config.input if i.optional} if config is not None else set()
        tensors = {}
        for m in metadata.inputs:
            shape = tuple(m.shape)
            tensors[m.name] = _Tensor(m.datatype, shape, tuple((i, d) for i, d in enumerate(shape) if d != -1),
                                      batch if batch > 0 and shape[:1] == (-1,) else 0)
        required = tuple(sorted(set(tensors) - optional))
    values = {name: _values(rule, spec.finite if rule.finite is None else rule.finite) for name, rule in spec.inputs.items()}
    return Validator(spec.max_request_bytes, spec.max_batch, tensors, required, values, _values(None, spec.finite))


class Backend(Protocol):
    """What Schemas needs of a backend: Triton's ModelMetadata and ModelConfig answers, cached."""

    async def cached(self, method: str, model: str, version: str) -> Any: ...


_Key = tuple[Backend, str, str]


class Schemas:
    """A route's validators, one per (backend, model, version), compiled from Triton's metadata and
    config on first use; concurrent first callers share one fetch. While Triton cannot answer, the
    YAML rules alone apply and the fetch is tried again RETRY_S later."""

    def __init__(self, spec: Validation, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self._clock = clock
        self._rules_only = compile_validator(spec, None, None)
        self._compiled: dict[_Key, Validator] = {}
        self._retry_at: dict[_Key, float] = {}
        self._flights: dict[_Key, asyncio.Task[Validator]] = {}

    def ready(self, backend: Backend, model: str, version: str) -> Validator | None:
        """The validator when it needs no fetch (compiled, or rules-only while a retry waits), else None."""
        if not self.spec.schema_:
            return self._rules_only
        key = (backend, model, version)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        return self._rules_only if self._clock() < self._retry_at.get(key, -math.inf) else None

    async def validator(self, backend: Backend, model: str, version: str) -> Validator:
        """The target's validator, fetching Triton's schema once (shared by concurrent callers)."""
        validator = self.ready(backend, model, version)
        if validator is not None:
            return validator
        key = (backend, model, version)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = asyncio.create_task(self._compile(key))
        return await asyncio.shield(flight)  # a cancelled caller leaves the fetch to the others

    async def _compile(self, key: _Key) -> Validator:
        """Fetch Triton's metadata and config and compile; on failure, rules-only until the retry."""
        backend, model, version = key
        try:
            metadata, config = await asyncio.gather(backend.cached("ModelMetadata", model, version),
                                                    backend.cached("ModelConfig", model, version))
        except GatewayError as e:
            log.warning("validation of %s version %r: YAML rules only for %gs, Triton's schema unavailable: %s",
                        model, version, RETRY_S, e.message)
            self._retry_at[key] = self._clock() + RETRY_S
            return self._rules_only
        finally:
            del self._flights[key]
        self._compiled[key] = compile_validator(self.spec, metadata, config)
        return self._compiled[key]
