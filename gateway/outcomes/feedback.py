"""Posted outcomes as the two frontends receive them (JSON over HTTP, infergate.v1.Feedback over
gRPC) turned into Feedback records, and the answer turned back. A malformed post is refused
whole (INVALID_ARGUMENT); a well-formed item that cannot be joined gets its own status."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidArgument
from gateway.outcomes.records import Feedback
from gateway.protocol import feedback_pb2

MAX_ITEMS = 10_000  # outcomes one post may carry


@dataclass(frozen=True, slots=True)
class Status:
    """One posted outcome's fate: joined, unknown, expired, duplicate or invalid."""

    status: str
    reason: str = ""


def from_json(model: str, doc: Any) -> list[Feedback]:
    """{"outcomes": [{"id"|"trace_id", "row", "label", "business": {name: number|bool}}, ...]}."""
    items = doc.get("outcomes") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise InvalidArgument("the body must be a JSON object with an 'outcomes' list")
    _check_size(len(items))
    return [_item(model, i, item) for i, item in enumerate(items)]


def from_proto(request: feedback_pb2.PostOutcomesRequest) -> list[Feedback]:
    _check_size(len(request.outcomes))
    return [Feedback(request.model, o.request_id, o.trace_id, o.row, o.label if o.HasField("label") else None,
                     dict(o.business)) for o in request.outcomes]


def to_json(statuses: list[Status]) -> dict[str, Any]:
    return {"joined": sum(s.status == "joined" for s in statuses),
            "results": [{"status": s.status, **({"reason": s.reason} if s.reason else {})} for s in statuses]}


def to_proto(statuses: list[Status]) -> feedback_pb2.PostOutcomesResponse:
    return feedback_pb2.PostOutcomesResponse(
        joined=sum(s.status == "joined" for s in statuses),
        results=[feedback_pb2.OutcomeStatus(status=s.status, reason=s.reason) for s in statuses])


def _check_size(n: int) -> None:
    if n == 0:
        raise InvalidArgument("no outcomes posted")
    if n > MAX_ITEMS:
        raise InvalidArgument(f"{n} outcomes in one post; at most {MAX_ITEMS}")


def _item(model: str, i: int, item: Any) -> Feedback:
    where = f"outcomes[{i}]"
    if not isinstance(item, dict):
        raise InvalidArgument(f"{where} is not an object")
    unknown = set(item) - {"id", "trace_id", "row", "label", "business"}
    if unknown:
        raise InvalidArgument(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    request_id, trace_id, row = item.get("id", ""), item.get("trace_id", ""), item.get("row", 0)
    if not isinstance(request_id, str) or not isinstance(trace_id, str):
        raise InvalidArgument(f"{where}: 'id' and 'trace_id' must be strings")
    if not isinstance(row, int) or isinstance(row, bool) or row < 0:
        raise InvalidArgument(f"{where}.row must be a non-negative integer")
    label = item.get("label")
    if label is not None:
        label = _number(label, f"{where}.label")
    business = item.get("business", {})
    if not isinstance(business, dict):
        raise InvalidArgument(f"{where}.business must be an object of named outcomes")
    return Feedback(model, request_id, trace_id, row, label,
                    {str(k): _number(v, f"{where}.business.{k}") for k, v in business.items()})


def _number(value: Any, where: str) -> float:
    """A number or a boolean (true/false as 1/0)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    raise InvalidArgument(f"{where} must be a number or true/false, got {type(value).__name__}")
