"""What the request path hands the audit log: one entry per request (and per shadow call), built
from references only, rendered into a record (digests, payload capture, redaction) in the log's
writer thread. The queue-full policy lives here: `drop` counts, `fail_closed` refuses up front."""
from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from gateway.audit.chain import iso_from_unix, iso_now, load_or_create_key
from gateway.audit.log import AuditLog, Observer
from gateway.config import Audit as AuditSpec
from gateway.errors import GatewayError, Unavailable
from gateway.observability.metrics import Metrics
from gateway.observability.trace import Trace
from gateway.protocol.tensors import CONTENTS, raw_to_json
from gateway.protocol.wire import parameter_text, pb

if TYPE_CHECKING:
    from gateway.dataplane import Call, Outcome

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
_WARN_EVERY_S = 10.0  # at most one "dropping audit records" warning per this many seconds


@dataclass(frozen=True, slots=True)
class Rendering:
    """How entries turn into records: fixed at start, shared by every entry."""

    subject_parameter: str | None
    capture_rate: float
    redact: frozenset[str]
    capture_max_bytes: int


@dataclass(slots=True)
class InferEntry:
    """One answered (or refused) inference request."""

    wall: float
    call: "Call"
    outcome: "Outcome"
    latency_s: float
    subject: str
    capture: bool
    rendering: Rendering

    def render(self) -> dict[str, Any]:
        call, out = self.call, self.outcome
        request = call.request
        response = pb.ModelInferResponse.FromString(out.response) if out.response else None
        record = _trace_fields(call.trace) | {
            "type": "infer",
            "time": iso_from_unix(self.wall),
            "request_id": call.request_id or None,
            "principal": call.principal.name if call.principal is not None else None,
            "via": call.principal.via if call.principal is not None else None,
            "client": call.client,
            "protocol": call.protocol,
            "model": call.model,
            "requested_version": call.version or None,
            "version": out.version or None,
            "target": out.target,
            "decision": out.decision or None,
            "fallback": out.fallback or None,
            "validation": out.validation,
            "code": out.code,
            "error": out.message or None,
            "latency_ms": round(self.latency_s * 1000.0, 3),
            "inputs": _input_digests(request) if request is not None else {},
            "outputs": _output_digests(response) if response is not None else {},
            "config_version": out.config_version,
            "subject": _subject(self.subject, request, self.rendering),
        }
        if self.capture and request is not None:
            record["payload"] = _payload(request, response, self.rendering)
        return record


@dataclass(slots=True)
class ShadowEntry:
    """One shadow call made on a request's behalf, linked to it by trace and parent span."""

    wall: float
    call: "Call"
    trace: Trace
    model: str
    target: str
    version: str
    code: str
    message: str
    latency_s: float
    response: bytes | None
    agree: bool | None
    subject: str
    rendering: Rendering

    def render(self) -> dict[str, Any]:
        response = pb.ModelInferResponse.FromString(self.response) if self.response else None
        return _trace_fields(self.trace) | {
            "type": "shadow",
            "subject": _subject(self.subject, self.call.request, self.rendering),
            "time": iso_from_unix(self.wall),
            "request_id": self.call.request_id or None,
            "principal": self.call.principal.name if self.call.principal is not None else None,
            "model": self.model,
            "target": self.target,
            "version": self.version or None,
            "code": self.code,
            "error": self.message or None,
            "latency_ms": round(self.latency_s * 1000.0, 3),
            "inputs": _input_digests(self.call.request),
            "outputs": _output_digests(response) if response is not None else {},
            "agree": self.agree,
        }


@dataclass(slots=True)
class RefusedEntry:
    """A request refused before it could be read: malformed, or credentials that do not verify."""

    wall: float
    trace: Trace
    model: str
    protocol: str
    client: str
    error: GatewayError
    request_id: str
    subject: str

    def render(self) -> dict[str, Any]:
        return _trace_fields(self.trace) | {
            "type": "infer",
            "subject": self.subject or None,
            "time": iso_from_unix(self.wall),
            "request_id": self.request_id or None,
            "model": self.model,
            "protocol": self.protocol,
            "client": self.client,
            "principal": None,
            "code": self.error.code.name,
            "error": self.error.message,
            "validation": "not_checked",
        }


@dataclass(slots=True)
class EventEntry:
    """A gateway event recorded as raised (a retrain signal): the record is already rendered."""

    record: dict[str, Any]

    def render(self) -> dict[str, Any]:
        return self.record


class Auditor:
    """The request path's handle on the audit log: `admit` before the work (fail_closed refuses
    when the log cannot take the record), `infer`/`shadow`/`refused` after it (never blocks)."""

    def __init__(self, spec: AuditSpec, base: Path, stream: str, metrics: Metrics) -> None:
        self.spec = spec
        directory = base / spec.dir
        key = load_or_create_key(base / spec.signing_key if spec.signing_key else directory / "signing-key.pem")
        self.log = AuditLog(directory, stream, key, capacity=spec.queue_size, fsync_interval_s=spec.fsync_interval_s,
                            max_segment_bytes=spec.max_segment_bytes, max_segment_age_s=spec.max_segment_age_s,
                            retention_s=spec.retention_days * 86400.0 if spec.retention_days else None,
                            observer=_MetricsObserver(metrics), max_bytes=spec.max_queue_bytes)
        self.metrics = metrics
        self.fail_closed = spec.policy == "fail_closed"
        self.subject_header = spec.subject.header.lower() if spec.subject.header else None
        capture = spec.capture
        self.rendering = Rendering(spec.subject.parameter, capture.rate, frozenset(capture.redact),
                                   capture.max_bytes)
        self._reserved = 0        # admitted requests whose record is not yet queued (fail_closed)
        self._warned = 0.0

    def open(self) -> None:
        self.log.open()
        self.metrics.audit_capacity(self.log.capacity)

    def close(self, timeout_s: float) -> None:
        self.log.close(timeout_s)

    def admit(self) -> None:
        """fail_closed: refuse with UNAVAILABLE while the queue has no room for this request's
        record, else hold a place for it (so at most queue_size requests are in flight)."""
        if self.fail_closed:
            if self.log.depth + self._reserved >= self.log.capacity or self.log.queued_bytes >= self.log.max_bytes:
                self.metrics.audit_refused()
                raise Unavailable("the audit log is not keeping up; request refused (audit policy fail_closed)")
            self._reserved += 1

    def infer(self, call: "Call", outcome: "Outcome", latency_s: float) -> None:
        """Queue the record of one request (after admit; exactly once per admitted request)."""
        rendering = self.rendering
        capture = rendering.capture_rate > 0.0 and random.random() < rendering.capture_rate
        entry = InferEntry(time.time(), call, outcome, latency_s, self.subject(call.headers), capture, rendering)
        size = len(call.raw) + len(outcome.response)
        if self.fail_closed:
            self._reserved -= 1
            self.log.append(entry, size, reserved=True)  # its place was held at admit
        else:
            self._append(entry, size)

    def shadow(self, call: "Call", trace: Trace, model: str, target: str, version: str, code: str, message: str,
               latency_s: float, response: bytes | None, agree: bool | None) -> None:
        """Queue the record of one shadow call made for call."""
        self._append(ShadowEntry(time.time(), call, trace, model, target, version, code, message, latency_s, response,
                                 agree, self.subject(call.headers), self.rendering),
                     len(call.raw) + len(response or b""))

    def refused(self, trace: Trace, model: str, protocol: str, client: str, error: GatewayError, request_id: str,
                headers: Mapping[str, str]) -> None:
        """Queue the record of a request refused before it could be read."""
        self._append(RefusedEntry(time.time(), trace, model, protocol, client, error, request_id, self.subject(headers)), 0)

    def feedback(self, model: str, principal: str | None, statuses: Mapping[str, int]) -> None:
        """Queue the record of one post of outcomes: who posted how many, and their fates (posted
        outcomes move quality metrics and can roll a canary back)."""
        self.event({"type": "feedback", "time": iso_now(), "model": model, "principal": principal,
                    "outcomes": sum(statuses.values()), "statuses": dict(statuses)})

    def event(self, record: dict[str, Any]) -> None:
        """Queue the record of a gateway event (its "type" names it), e.g. a retrain signal."""
        self._append(EventEntry(record), 0)

    def subject(self, headers: Mapping[str, str]) -> str:
        return (headers.get(self.subject_header) or "") if self.subject_header else ""

    def _append(self, entry: Any, size: int) -> None:
        """Queue an entry no place was held for: under fail_closed it may not take the places
        admitted requests hold."""
        if not (self.fail_closed and self.log.depth + self._reserved >= self.log.capacity) and self.log.append(entry, size):
            return
        self.metrics.audit_dropped()
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            log.warning("audit queue full (%d records or %d bytes): dropping records (policy %s)",
                        self.log.capacity, self.log.max_bytes, self.spec.policy)


class _MetricsObserver(Observer):
    """The writer thread's events as Prometheus metrics (prometheus-client is thread-safe)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def written(self, records: int, depth: int) -> None:
        self.metrics.audit_written(records, depth)

    def failed(self, stage: str) -> None:
        self.metrics.audit_failed(stage)

    def recovered(self, torn_bytes: int) -> None:
        self.metrics.audit_recovered()

    def sealed(self, final: bool) -> None:
        self.metrics.audit_sealed(final)


def _subject(header_value: str, request: pb.ModelInferRequest, rendering: Rendering) -> str | None:
    """The data subject: the header's value, else the request parameter's."""
    if header_value:
        return header_value
    return (parameter_text(request, rendering.subject_parameter) if rendering.subject_parameter else "") or None


def _trace_fields(trace: Trace) -> dict[str, Any]:
    return {"trace_id": trace.trace_id, "span_id": trace.span_id, "parent_span_id": trace.parent_id or None}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _input_digests(request: pb.ModelInferRequest) -> dict[str, str]:
    """SHA-256 of each input's raw bytes (v2 binary layout), or of its serialized typed contents."""
    raw = request.raw_input_contents
    if len(raw) == len(request.inputs):
        return {t.name: _digest(raw[i]) for i, t in enumerate(request.inputs)}
    return {t.name: _digest(t.contents.SerializeToString(deterministic=True)) for t in request.inputs}


def _output_digests(response: pb.ModelInferResponse) -> dict[str, str]:
    raw = response.raw_output_contents
    return {t.name: _digest(raw[i] if i < len(raw) else t.contents.SerializeToString(deterministic=True))
            for i, t in enumerate(response.outputs)}


def _payload(request: pb.ModelInferRequest, response: pb.ModelInferResponse | None, rendering: Rendering) -> dict[str, Any]:
    """The captured tensors and parameters, redacted by name; tensors over max_bytes keep only their digest."""
    raw = request.raw_input_contents
    inputs = {t.name: _tensor(t.name, t.datatype, list(t.shape), raw[i] if len(raw) == len(request.inputs) else None,
                              t.contents, rendering) for i, t in enumerate(request.inputs)}
    parameters = {k: REDACTED if k in rendering.redact else parameter_text(request, k) for k in request.parameters}
    doc: dict[str, Any] = {"inputs": inputs, "parameters": parameters}
    if response is not None:
        out = response.raw_output_contents
        doc["outputs"] = {t.name: _tensor(t.name, t.datatype, list(t.shape), out[i] if i < len(out) else None,
                                          t.contents, rendering) for i, t in enumerate(response.outputs)}
    return doc


def _tensor(name: str, datatype: str, shape: list[int], raw: bytes | None, contents: Any,
            rendering: Rendering) -> dict[str, Any]:
    doc: dict[str, Any] = {"datatype": datatype, "shape": shape}
    size = len(raw) if raw is not None else contents.ByteSize()
    if name in rendering.redact:
        doc["data"] = REDACTED
    elif size > rendering.capture_max_bytes:
        doc["data"], doc["truncated"] = None, True
    elif raw is not None:
        try:  # a request refused for its malformed tensor bytes is still recorded, without them
            data = raw_to_json(datatype, raw)
        except (ValueError, GatewayError):
            doc["data"], doc["undecodable"] = None, True
        else:
            doc["data"] = data.tolist() if isinstance(data, np.ndarray) else data
    else:
        field = CONTENTS.get(datatype)
        doc["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                       for v in getattr(contents, field)] if field else None
    return doc
