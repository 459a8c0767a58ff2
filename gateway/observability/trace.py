"""W3C Trace Context: the caller's `traceparent`/`tracestate` (or a new trace), the gateway's own
span in it, and the trace id on every log line written while a request runs."""
from __future__ import annotations

import contextvars
import logging
import random
from dataclasses import dataclass
from typing import Mapping

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_MAX_STATE = 512  # tracestate longer than the spec's 32 members x ~16 bytes is dropped, not forwarded

current: contextvars.ContextVar["Trace | None"] = contextvars.ContextVar("infergate_trace", default=None)


@dataclass(frozen=True, slots=True)
class Trace:
    """One hop of a trace: the trace id, this gateway's span id, the caller's span (parent) id."""

    trace_id: str
    span_id: str
    parent_id: str   # "" when the gateway started the trace
    flags: str       # two hex digits: 01 = sampled by the caller (other bits are reserved: passed on as 0)
    state: str = ""  # the caller's tracestate, passed on unchanged

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> "Trace":
        """Continue the caller's trace when its traceparent is valid, else start a new one."""
        parent = headers.get(TRACEPARENT)
        if parent:
            parsed = _parse(parent)
            if parsed is not None:
                state = _state(headers)
                return cls(parsed[0], _span_id(), parsed[1], parsed[2], state if len(state) <= _MAX_STATE else "")
        return cls(f"{random.getrandbits(128) or 1:032x}", _span_id(), "", "00")

    def traceparent(self) -> str:
        """The header that names this gateway's span: sent to Triton and back to the caller."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> "Trace":
        """A new span under this one (a shadow call made on the request's behalf)."""
        return Trace(self.trace_id, _span_id(), self.span_id, self.flags, self.state)

    def headers(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata / HTTP headers that carry this span downstream."""
        if self.state:
            return (TRACEPARENT, self.traceparent()), (TRACESTATE, self.state)
        return ((TRACEPARENT, self.traceparent()),)


def _state(headers: Mapping[str, str]) -> str:
    """tracestate, its list members joined when they came in several header fields."""
    getall = getattr(headers, "getall", None)
    values = getall(TRACESTATE, None) if getall is not None else None
    return ",".join(values) if values else headers.get(TRACESTATE) or ""


def _span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def _parse(value: str) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) from a traceparent, or None when it is not valid: version
    ff, upper-case or non-hex digits, all-zero ids, or extra fields on version 00 are refused."""
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, parent_id, flags = parts[:4]
    if len(version) != 2 or version == "ff" or (version == "00" and len(parts) != 4):
        return None
    if len(trace_id) != 32 or len(parent_id) != 16 or len(flags) != 2:
        return None
    if not _HEX.issuperset(version + trace_id + parent_id + flags) or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, f"{int(flags, 16) & 0x01:02x}"  # only "sampled" is defined: other bits go out 0


class TraceLogFilter(logging.Filter):
    """Adds `trace_id` to every log record: the trace of the request being answered, else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = current.get()
        record.trace_id = trace.trace_id if trace is not None else "-"
        return True


def install_log_filter() -> None:
    """Put the trace id on the records of every handler the root logger has (after basicConfig)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(TraceLogFilter())
