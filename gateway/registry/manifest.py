"""A model version's manifest: its lineage and evaluation, written as `manifest.json` inside the
signed tree, so the signature covers it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FILE = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """What a producer declares about one version (docs/registry.md)."""

    model: str
    training_commit: str
    dataset_snapshot: str
    trained_at: str                     # ISO-8601; UTC when it names no zone
    feature_schema_version: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    risk_tier: str = "standard"         # which approval rule a promotion needs
    intended_use: str = ""
    limitations: str = ""
    producer: str = ""

    def __post_init__(self) -> None:
        for name in ("model", "training_commit", "dataset_snapshot", "feature_schema_version", "risk_tier"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"manifest: '{name}' must be a non-empty string")
        if not isinstance(self.hyperparameters, dict):
            raise ValueError("manifest: 'hyperparameters' must be an object")
        if not isinstance(self.metrics, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in self.metrics.values()):
            raise ValueError("manifest: 'metrics' must map names to numbers")
        self.trained_at_unix  # noqa: B018 - validates trained_at

    @property
    def trained_at_unix(self) -> float:
        try:
            when = datetime.fromisoformat(self.trained_at.replace("Z", "+00:00"))
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"manifest: 'trained_at' is not an ISO-8601 time: {self.trained_at!r}") from None
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ValueError(f"manifest: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("manifest: not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"manifest: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**doc)
        except TypeError as e:
            raise ValueError(f"manifest: {e}") from None

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        return cls.from_json(Path(path).read_bytes())
