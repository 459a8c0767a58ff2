"""The live side of drift: histogram counts that merge across workers (`Counts`), the binner that
adds one request into them (`Binner`), and the window that decides which requests they cover
(`Window`). One writer per state, the worker's event loop: no locks, no threads."""
from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

from gateway.config import DriftWindow
from gateway.drift.kernels import bin_categorical, bin_numeric, bin_output, warm_up
from gateway.drift.profile import FeatureProfile, Profile

_FLOATS = frozenset((np.dtype(np.float32), np.dtype(np.float64)))   # native byte order only


def _by_input(profile: Profile) -> list[tuple[str, list[FeatureProfile], list[FeatureProfile]]]:
    """Features grouped as the counts store them: by input (first seen first), numeric then categorical."""
    groups: dict[str, tuple[list[FeatureProfile], list[FeatureProfile]]] = {}
    for f in profile.features:
        groups.setdefault(f.input, ([], []))[f.kind == "categorical"].append(f)
    return [(name, numeric, categorical) for name, (numeric, categorical) in groups.items()]


@dataclass(frozen=True)
class Layout:
    """What the rows of a Counts are: one per feature (`width` bins, the last for NaN / other
    codes), then one per class of each output (`bins` bins, the last for NaN) in the order given."""

    features: tuple[str, ...]
    width: int
    outputs: tuple[tuple[str, int], ...]   # (output profile name, classes)
    bins: int

    @classmethod
    def of(cls, profile: Profile) -> Layout:
        names = tuple(f.name for _, numeric, categorical in _by_input(profile) for f in numeric + categorical)
        width = max((len(f.edges) + (2 if f.kind == "numeric" else 1) for f in profile.features), default=1)
        return cls(names, width, tuple((o.name, o.classes) for o in profile.outputs),
                   max((len(o.edges) + 2 for o in profile.outputs), default=1))

    def classes(self, output: str) -> slice:
        """The rows of the classes of output (its profile's name) in probs and argmax."""
        first = 0
        for name, classes in self.outputs:
            if name == output:
                return slice(first, first + classes)
            first += classes
        raise ValueError(f"no output {output!r} in these counts (outputs: {[name for name, _ in self.outputs]})")


@dataclass(eq=False)
class Counts:
    """Histogram counts and the number of requests n, all float64 (so that decay can scale them),
    in one flat buffer (merged, scaled and shipped whole) seen through three views: features
    [len(layout.features), layout.width], probs [classes of all outputs, layout.bins], argmax [classes]."""

    layout: Layout
    data: np.ndarray
    n: float = 0.0
    features: np.ndarray = field(init=False, repr=False)
    probs: np.ndarray = field(init=False, repr=False)
    argmax: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        classes = sum(c for _, c in self.layout.outputs)
        ends = np.cumsum([len(self.layout.features) * self.layout.width, classes * self.layout.bins, classes])
        if self.data.shape != (ends[-1],):
            raise ValueError(f"counts of this layout hold {ends[-1]} values, not {self.data.size}")
        self.features = self.data[:ends[0]].reshape(-1, self.layout.width)
        self.probs = self.data[ends[0]:ends[1]].reshape(classes, self.layout.bins)
        self.argmax = self.data[ends[1]:]

    @classmethod
    def zeros(cls, layout: Layout) -> Counts:
        classes = sum(c for _, c in layout.outputs)
        return cls(layout, np.zeros(len(layout.features) * layout.width + classes * (layout.bins + 1)))

    def zeros_like(self) -> Counts:
        return Counts.zeros(self.layout)

    def merge(self, other: Counts) -> Counts:
        """The sum of two counts of the same layout (two workers, two windows)."""
        if other.layout != self.layout:
            raise ValueError("cannot merge counts of different profiles")
        return Counts(self.layout, self.data + other.data, self.n + other.n)

    def scaled(self, factor: float) -> Counts:
        """Every count times factor (decay); scaled(1.0) is a snapshot."""
        return Counts(self.layout, self.data * factor, self.n * factor)

    def to_bytes(self) -> bytes:
        """Length-prefixed JSON of layout and n, then the buffer as little-endian float64."""
        head = json.dumps({"layout": asdict(self.layout), "n": self.n}).encode()
        return struct.pack("<I", len(head)) + head + self.data.astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Counts:
        """The counts to_bytes wrote; ValueError when the bytes are not that."""
        try:
            (size,) = struct.unpack_from("<I", data)
            head = json.loads(data[4:4 + size])
            spec = head["layout"]
            layout = Layout(tuple(spec["features"]), int(spec["width"]), tuple((o, int(c)) for o, c in spec["outputs"]),
                            int(spec["bins"]))
            return cls(layout, np.frombuffer(data, "<f8", offset=4 + size).astype(np.float64), float(head["n"]))
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not drift counts: {e}") from e


def _rows(x: np.ndarray, name: str, columns: int, exact: bool) -> np.ndarray:
    """x as the kernels take it: [B, F] C-contiguous float32/float64 (a view when it is one already:
    float tensors decoded from request bytes are), checked to have the columns they will read."""
    if x.ndim != 2:
        if x.ndim != 1:
            raise ValueError(f"tensor {name!r} has shape {x.shape}; drift profiles take [B, F] or [F]")
        x = x[None]
    if x.shape[1] < columns or exact and x.shape[1] != columns:
        raise ValueError(f"tensor {name!r} has {x.shape[1]} columns, its drift profile needs {'' if exact else '>= '}{columns}")
    if x.dtype not in _FLOATS or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, np.float64)
    return x


def _feature_minor(columns: list[np.ndarray]) -> np.ndarray:
    """Ragged per-feature tables as one [max length, F] array, padded with NaN."""
    table = np.full((max((len(c) for c in columns), default=0), len(columns)), np.nan)
    for i, values in enumerate(columns):
        table[:len(values), i] = values
    return table


class Binner:
    """A profile compiled for the kernels: observe() adds one request's tensors into counts."""

    def __init__(self, profile: Profile) -> None:
        """Compiles the profile's tables and warms the kernels up (once per process)."""
        warm_up()
        self.layout = Layout.of(profile)
        self._inputs = []   # (kernel, input, columns it needs, columns, table, first row)
        first = 0
        for name, *kinds in _by_input(profile):
            need = 1 + max(f.column for features in kinds for f in features)
            for kernel, features in zip((bin_numeric, bin_categorical), kinds):
                if features:
                    columns = np.array([f.column for f in features], np.int64)
                    self._inputs.append((kernel, name, need, columns, _feature_minor([f.edges for f in features]), first))
                    first += len(features)
        self._outputs = [   # (name, tensor, classes, columns, edges [bins - 1, classes], first row)
            (o.name, o.output, o.classes, np.arange(o.classes, dtype=np.int64),
             np.ascontiguousarray(np.repeat(o.edges[:, None], o.classes, axis=1)), self.layout.classes(o.name).start)
            for o in profile.outputs]

    def zeros(self) -> Counts:
        return Counts.zeros(self.layout)

    def observe(self, counts: Counts, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> None:
        """Add a request's tensors ([B, F], or [F] for one row) into counts; tensors the profile
        does not know are ignored, missing ones skipped. ValueError for a tensor of a shape the
        profile cannot read (those before it are counted). Does not count the request (counts.n)."""
        if counts.layout is not self.layout and counts.layout != self.layout:
            raise ValueError("counts of another profile")
        for kernel, name, need, columns, table, first in self._inputs:
            x = inputs.get(name)
            if x is not None:
                kernel(_rows(x, name, need, False), columns, table, counts.features, first)
        for name, tensor, classes, columns, edges, first in self._outputs if outputs is not None else ():
            p = outputs.get(tensor)
            if p is not None:
                bin_output(_rows(p, name, classes, True), columns, edges, counts.probs, counts.argmax, first)


class Window:
    """Which requests the counts statistics judge, by spec.kind:
    - count: tumbling windows of spec.size requests. judged() is the last full window, or the one
      filling while there is none yet.
    - time: tumbling windows of spec.seconds from the Window's creation; a request counts in the
      window its arrival falls in (record() rotates when one is due, judged() too). judged() is the
      last completed window (empty, n == 0, if no request came in it), or the current before one.
    - decay: one set of counts, multiplied by 0.5 ** (elapsed / spec.half_life_s) at each tick();
      a request recorded between two ticks decays as if it came at the earlier one, so ages are
      off by at most the tick interval (judged() ticks; call it or tick() every few seconds).
      judged() is the current counts.
    judged() returns counts no later record() changes."""

    def __init__(self, spec: DriftWindow, binner: Binner, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self._binner, self._clock = spec, binner, clock
        self._kind, self._size, self._seconds = spec.kind, spec.size, spec.seconds
        self.current = binner.zeros()
        self.completed: Counts | None = None
        self._since = clock()   # start of the current time window, or the last decay

    def record(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> None:
        """The hot path: add one request."""
        if self._kind == "time" and self._clock() - self._since >= self._seconds:
            self.tick()
        self._binner.observe(self.current, inputs, outputs)
        self.current.n += 1
        if self._kind == "count" and self.current.n >= self._size:
            self.completed, self.current = self.current, self.current.zeros_like()

    def tick(self) -> None:
        """Rotate a time window that is due; decay a decaying one."""
        now = self._clock()
        if self._kind == "time":
            elapsed = int((now - self._since) // self._seconds)
            if elapsed >= 1:
                self.completed = self.current if elapsed == 1 else self.current.zeros_like()
                self.current = self.current.zeros_like()
                self._since += elapsed * self._seconds
        elif self._kind == "decay":
            self.current = self.current.scaled(0.5 ** ((now - self._since) / self.spec.half_life_s))
            self._since = now

    def judged(self) -> Counts:
        """The counts statistics should look at (see the class docstring)."""
        self.tick()
        return self.completed if self.completed is not None else self.current.scaled(1.0)
