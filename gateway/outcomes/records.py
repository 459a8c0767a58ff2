"""The shapes the outcomes room passes around: what is remembered of a prediction, what a caller
posts back, and the two joined."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the gateway keeps of one answered request until its time-to-live passes."""

    model: str                       # the public model name
    request_id: str                  # the client's id ("" if it sent none: then only the trace id joins)
    trace_id: str                    # 32 hex digits
    target: str                      # the route target that answered
    version: str                     # the backend version that answered
    decision: str                    # version | pin | active | sticky | weight
    segments: dict[str, str]         # segment attribute -> value (declared values only, else "other")
    rows: list[list[float]]          # the prediction: one list of floats per batch row (class scores, or one value)
    at: float                        # unix time of the answer
    expires_at: float                # unix time after which a post for it is answered "expired"


@dataclass(frozen=True, slots=True)
class Feedback:
    """One posted outcome for an earlier request, named by request id or trace id."""

    model: str
    request_id: str = ""
    trace_id: str = ""
    row: int = 0                                         # which batch row the outcome is for
    label: float | None = None                           # ground truth: a class index or a value
    business: dict[str, float] = field(default_factory=dict)  # named outcomes (bool as 0/1)


@dataclass(frozen=True, slots=True)
class Joined:
    """A prediction with the outcome posted for it."""

    prediction: Prediction
    feedback: Feedback
    joined_at: float
