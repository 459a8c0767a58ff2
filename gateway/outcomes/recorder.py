"""A route's outcome collection, compiled when the route table is built: what the request path
hands the join store for each answer (references and a few header lookups), how the store's
writer thread turns that into a Prediction (off the path: parsing the answer, reading segment
features), and how a posted outcome is checked against what the route declares."""
from __future__ import annotations

import asyncio
import bisect
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from gateway import config
from gateway.outcomes import quality
from gateway.outcomes.feedback import Status
from gateway.outcomes.records import Feedback, Prediction
from gateway.protocol.tensors import views
from gateway.protocol.wire import pb

if TYPE_CHECKING:
    from gateway.outcomes.hub import OutcomeHub
    from gateway.outcomes.store import JoinReport

OTHER = "other"  # the segment value of anything outside a header segment's declared values
# Join store statuses of an outcome that cannot belong to the prediction it names: answered "invalid".
_DOES_NOT_FIT = frozenset({"bad_row", "misfit"})


@dataclass(frozen=True, slots=True)
class Answered:
    """One answer as the request path hands it over: references only, decoded later."""

    recorder: "Recorder"
    request_id: str
    trace_id: str
    target: str
    version: str
    decision: str
    segments: dict[str, str]        # the header segments, read while the headers are at hand
    request: pb.ModelInferRequest
    response: bytes
    at: float


@dataclass(frozen=True, slots=True)
class _Band:
    """An input segment: one feature of an input tensor, cut at ascending edges."""

    name: str
    input: str
    index: int
    edges: tuple[float, ...]
    labels: tuple[str, ...]


def band_labels(edges: list[float]) -> tuple[str, ...]:
    """'<e0', '[e0,e1)', ..., '>=en': the values an input segment takes."""
    def g(x: float) -> str:
        return f"{x:g}"
    inner = tuple(f"[{g(a)},{g(b)})" for a, b in zip(edges, edges[1:]))
    return (f"<{g(edges[0])}", *inner, f">={g(edges[-1])}")


class Recorder:
    """One route's `outcomes` declaration, ready for the request path and the join."""

    def __init__(self, public: str, spec: config.Outcomes, hub: "OutcomeHub") -> None:
        self.public = public
        self.spec = spec
        self.hub = hub
        self._headers = tuple((name, s.header.lower(), frozenset(s.values))
                              for name, s in spec.segments.items() if s.header is not None)
        self._bands = tuple(_Band(name, s.input, s.index, tuple(map(float, s.bins)), band_labels(s.bins))
                            for name, s in spec.segments.items() if s.input is not None)
        self._inputs = frozenset(b.input for b in self._bands)
        self._decode = self.decode  # bound once: remember runs on every answer
        # what a row keeps: a classifier's every class score; otherwise the first value, all a
        # regressor's quality reads (a wide output would cost the store its size on every answer)
        self._width = None if spec.task == "classifier" else 1

    def remember(self, request_id: str, trace_id: str, target: str, version: str, decision: str,
                 headers: Mapping[str, str], request: pb.ModelInferRequest, response: bytes) -> None:
        """Hand one answer to the store's queue (never blocks, never fails the answer)."""
        segments = {}
        for name, header, values in self._headers:
            value = headers.get(header)
            segments[name] = value if value in values else OTHER
        self.hub.store.remember(Answered(self, request_id, trace_id, target, version, decision, segments,
                                     request, response, time.time()), self._decode)

    def decode(self, a: Answered) -> Prediction:
        """The Prediction kept for one answer (the store's writer thread calls this). The output
        tensor becomes one row of floats per batch entry (a classifier's scores; else its first
        value); an input segment reads batch row 0."""
        answer = pb.ModelInferResponse.FromString(a.response)
        wanted = self.spec.output or (answer.outputs[0].name if answer.outputs else "")
        output = views(answer.outputs, answer.raw_output_contents, (wanted,)).get(wanted)
        rows = [] if output is None else \
            np.asarray(output, np.float64).reshape(output.shape[0] if output.ndim else 1, -1)[:, :self._width].tolist()
        segments = dict(a.segments)
        if self._bands:
            inputs = views(a.request.inputs, a.request.raw_input_contents, self._inputs)
            for band in self._bands:
                tensor = inputs.get(band.input)
                segments[band.name] = _band(band, tensor)
        return Prediction(self.public, a.request_id, a.trace_id, a.target, a.version, a.decision, segments,
                          rows, a.at, a.at + self.spec.ttl_s)

    def check(self, item: Feedback) -> str | None:
        """Why a posted outcome cannot be joined as it is (None: it can)."""
        if not item.request_id and not item.trace_id:
            return "names neither a request id nor a trace id"
        if "\x00" in item.request_id:
            return "the request id contains a NUL character"
        if item.trace_id and (len(item.trace_id) != 32 or not _is_hex(item.trace_id)):
            return f"trace id {item.trace_id!r} is not 32 lower-case hex digits"
        if item.label is None and not item.business:
            return "carries neither a label nor a business outcome"
        if item.label is not None:
            if not math.isfinite(item.label):
                return f"label {item.label!r} is not a finite number"
            if self.spec.task == "none":
                return "this model takes no labels (outcomes.task is 'none')"
            if self.spec.task == "classifier" and (item.label < 0 or item.label != int(item.label)):
                return f"label {item.label!r} is not a class index"
        for name, value in item.business.items():
            kind = self.spec.business.get(name)
            if kind is None:
                return f"business outcome {name!r} is not declared (declared: {', '.join(self.spec.business) or 'none'})"
            if not math.isfinite(value) or value < 0 or (kind == "rate" and value not in (0.0, 1.0)):
                return f"business outcome {name!r} = {value!r} is not {'true/false' if kind == 'rate' else 'a finite number >= 0'}"
        return None

    def fits(self, item: Feedback, row: Sequence[float]) -> str | None:
        """Why a checked outcome cannot belong to the prediction row it names (None: it can): a
        classifier's label must be one of the row's classes (one score is a binary classifier's)."""
        if item.label is not None and not all(map(math.isfinite, row)):
            return "the prediction it names is not finite (NaN or infinity): it has no quality to measure"
        if self.spec.task == "classifier" and item.label is not None and item.label >= max(len(row), 2):
            return f"label {item.label:g} is not a class of this prediction (it has {max(len(row), 2)})"
        return None

    def score(self, row: Sequence[float], label: float) -> float:
        """What the A/B test's "label" outcome sums per joined row (the store keeps it): 1.0 when a
        classifier's top class is the label (a one-score row is a binary classifier's P(class 1)),
        else 0.0; a regressor's absolute error."""
        if self.spec.task == "classifier":
            return float(quality.classifier_increments(row, label).correct)
        return abs(float(row[0]) - label)

    def _join(self, items: list[Feedback]) -> JoinReport:
        """Join in one store transaction and count what joined (a thread's work: a post of
        thousands of outcomes takes the counters seconds, which the event loop must not wait for)."""
        report = self.hub.store.join(items, time.time(), self.fits, self.score)
        for joined in report.joined:
            self.hub.count(self, joined)
        return report

    async def post(self, items: list[Feedback]) -> list[Status]:
        """Check each posted outcome, join the good ones in one store transaction (in a thread:
        the store may be a network away), count what joined; every item's fate in order."""
        statuses: list[Status | None] = []
        good: list[Feedback] = []
        for item in items:
            reason = self.check(item)
            statuses.append(Status("invalid", reason) if reason else None)
            if reason is None:
                good.append(item)
        results = iter(await asyncio.to_thread(self._join, good) if good else ())
        out = []
        for status in statuses:
            if status is None:
                result = next(results)
                status = Status("invalid" if result.status in _DOES_NOT_FIT else result.status.value, result.reason)
            self.hub.metrics.posted(self.public, status.status)
            out.append(status)
        return out


def _band(band: _Band, tensor: np.ndarray | None) -> str:
    """The band of batch row 0's feature, or 'other' when the request does not carry it."""
    if tensor is None or tensor.size == 0:
        return OTHER
    flat = tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 1 else tensor.reshape(1, -1)
    if band.index >= flat.shape[1]:
        return OTHER
    value = float(flat[0, band.index])
    if not math.isfinite(value):
        return OTHER
    return band.labels[bisect.bisect_right(band.edges, value)]


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
