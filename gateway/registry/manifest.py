"""A model version's manifest: its lineage and evaluation, written as `manifest.json` inside the
signed tree, so the signature covers it. Unknown fields are refused rather than ignored: a
misspelt `risk_tier` must not fall back to the default tier's approval rule."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

FILE = "manifest.json"   # its name inside a signed tree
_REQUIRED_TEXT = ("model", "training_commit", "dataset_snapshot", "trained_at", "feature_schema_version", "risk_tier")
_TEXT = (*_REQUIRED_TEXT, "intended_use", "limitations", "producer")


def _require(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"manifest field {name!r}: {reason}")


def _utc(text: str) -> datetime:
    """The time an ISO-8601 string with a UTC zone ("Z" or "+00:00") names; ValueError otherwise."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    _require(when is not None, "trained_at", f"{text!r} is not an ISO-8601 time")
    _require(when.utcoffset() == timedelta(0), "trained_at", f"{text!r} is not in UTC (end it in Z)")
    return when


@dataclass(frozen=True)
class Manifest:
    """What a producer declares about one version: where it came from, how it scored, what it is for."""

    model: str
    training_commit: str
    dataset_snapshot: str
    trained_at: str                     # ISO-8601 in UTC, e.g. 2026-01-01T00:00:00Z
    feature_schema_version: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    risk_tier: str = "standard"         # names the approval rule (k of n) a promotion needs
    intended_use: str = ""
    limitations: str = ""
    producer: str = ""

    def __post_init__(self) -> None:
        for name in _TEXT:
            _require(isinstance(getattr(self, name), str), name, "must be a string")
        for name in _REQUIRED_TEXT:
            _require(getattr(self, name) != "", name, "must not be empty")
        _require(isinstance(self.hyperparameters, dict) and all(isinstance(k, str) for k in self.hyperparameters),
                 "hyperparameters", "must be an object with string keys")
        _require(isinstance(self.metrics, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in self.metrics.items()), "metrics", "must map names to finite numbers")
        object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})
        _utc(self.trained_at)

    @property
    def trained_at_unix(self) -> float:
        """trained_at as Unix seconds."""
        return _utc(self.trained_at).timestamp()

    def to_json(self) -> bytes:
        """The manifest file: sorted keys, indented for people reading a diff."""
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """The manifest in a manifest file; ValueError naming the field that is missing, unknown or wrong."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"manifest: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("manifest: not a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(doc.keys() - known.keys())
        if unknown:
            raise ValueError(f"manifest field {unknown[0]!r}: unknown")
        missing = [n for n, f in known.items() if n not in doc and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"manifest field {missing[0]!r}: missing")
        return cls(**doc)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """The manifest file at path (OSError when unreadable, ValueError naming the field)."""
        return cls.from_json(Path(path).read_bytes())
