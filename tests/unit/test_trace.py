"""W3C trace context: which traceparents are continued, which start a new trace, what goes on."""
from __future__ import annotations

import logging

import pytest

from gateway.observability.trace import Trace, TraceLogFilter, current

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    trace = Trace.from_headers({"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": "vendor=abc"})
    assert (trace.trace_id, trace.parent_id, trace.flags, trace.state) == (TRACE_ID, PARENT, "01", "vendor=abc")
    assert trace.span_id != PARENT and len(trace.span_id) == 16
    assert trace.traceparent() == f"00-{TRACE_ID}-{trace.span_id}-01"
    assert dict(trace.headers()) == {"traceparent": trace.traceparent(), "tracestate": "vendor=abc"}


@pytest.mark.parametrize("header", [
    "", "garbage", f"ff-{TRACE_ID}-{PARENT}-01", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE_ID}-{'0' * 16}-01",
    f"00-{TRACE_ID.upper()}-{PARENT}-01", f"00-{TRACE_ID}-{PARENT}-01-extra", f"00-{TRACE_ID[:-1]}-{PARENT}-01",
    f"00-{TRACE_ID}-{PARENT}-1", f"0x-{TRACE_ID}-{PARENT}-01",
])
def test_an_invalid_traceparent_starts_a_new_trace_and_drops_its_state(header: str) -> None:
    trace = Trace.from_headers({"traceparent": header, "tracestate": "vendor=abc"})
    assert trace.trace_id != TRACE_ID and len(trace.trace_id) == 32 and trace.trace_id != "0" * 32
    assert (trace.parent_id, trace.state, trace.flags) == ("", "", "00")


def test_a_later_version_is_read_by_its_first_four_fields() -> None:
    trace = Trace.from_headers({"traceparent": f"01-{TRACE_ID}-{PARENT}-01-future"})
    assert (trace.trace_id, trace.parent_id) == (TRACE_ID, PARENT)


def test_new_traces_and_spans_are_distinct() -> None:
    traces = {Trace.from_headers({}).trace_id for _ in range(1000)}
    assert len(traces) == 1000


def test_a_child_span_hangs_under_its_parent() -> None:
    parent = Trace.from_headers({"traceparent": f"00-{TRACE_ID}-{PARENT}-01"})
    child = parent.child()
    assert (child.trace_id, child.parent_id, child.flags) == (TRACE_ID, parent.span_id, "01")
    assert child.span_id != parent.span_id


def test_log_records_carry_the_current_trace_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    TraceLogFilter().filter(record)
    assert record.trace_id == "-"  # type: ignore[attr-defined]
    token = current.set(Trace.from_headers({"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}))
    try:
        TraceLogFilter().filter(record)
        assert record.trace_id == TRACE_ID  # type: ignore[attr-defined]
    finally:
        current.reset(token)


def test_reserved_flag_bits_go_out_as_zero() -> None:
    trace = Trace.from_headers({"traceparent": f"00-{TRACE_ID}-{PARENT}-ff"})
    assert trace.flags == "01" and trace.traceparent().endswith("-01")
    assert Trace.from_headers({"traceparent": f"00-{TRACE_ID}-{PARENT}-fe"}).flags == "00"


def test_tracestate_in_several_fields_is_joined() -> None:
    class Multi(dict):
        def getall(self, key, default=None):
            return ["a=1", "b=2"] if key == "tracestate" else default

    trace = Trace.from_headers(Multi({"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": "a=1"}))
    assert trace.state == "a=1,b=2"
