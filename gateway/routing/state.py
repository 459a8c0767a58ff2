"""Live routing state that is not in the routing file: admin overrides and rollout progress,
kept in a small JSON file beside the routing file so every worker applies the same state, and
per-target outcome windows that the rollout gates read."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from gateway.config import Route as RouteSpec

RolloutPhase = Literal["progressing", "promoted", "rolled_back"]
Signature = tuple[int, int, int] | None   # (inode, mtime ns, size): a file changed when this does


@dataclass
class RolloutStatus:
    step: int = 0                    # index into the rollout's steps
    since: float = field(default_factory=time.time)   # when this step began (wall clock)
    phase: RolloutPhase = "progressing"
    reason: str = ""


@dataclass
class RouteState:
    """Runtime overrides of one route; empty means the file decides."""

    weights_override: dict[str, int] | None = None
    active: str | None = None
    rollout: RolloutStatus | None = None
    versions: dict[str, str] | None = None   # target -> backend version proposed at runtime (registry-sync)
    spec_hash: str = ""     # the route's file entry this state was made for; another entry drops it

    def weights(self, spec: RouteSpec) -> dict[str, int]:
        """Live weights: an admin override, else the rollout's current step, else the file's."""
        file_weights = {name: t.weight for name, t in spec.named_targets().items()}
        if self.overrides_weights(spec):
            assert self.weights_override is not None
            return {name: self.weights_override.get(name, 0) for name in file_weights}
        if spec.rollout is None:
            return file_weights
        status = self.rollout or RolloutStatus()
        percent = {"promoted": 100, "rolled_back": 0}.get(status.phase, spec.rollout.steps[min(status.step, len(spec.rollout.steps) - 1)])
        return rollout_weights(file_weights, spec.rollout.target, percent)

    def overrides_weights(self, spec: RouteSpec) -> bool:
        """An admin weights override in force: one naming only this route's targets (a stale one is ignored)."""
        return self.weights_override is not None and set(self.weights_override) <= set(spec.named_targets())

    def is_empty(self) -> bool:
        return self.weights_override is None and self.active is None and self.rollout is None and not self.versions


def spec_hash(spec: RouteSpec) -> str:
    """A short digest of a route's entry in the routing file."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def signature(path: Path) -> Signature:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def rollout_weights(file_weights: dict[str, int], canary: str, percent: int) -> dict[str, int]:
    """The canary gets percent; the others share the rest in proportion to their file weights."""
    others = {n: w for n, w in file_weights.items() if n != canary}
    total = sum(others.values())
    shares = {n: (w / total if total else 1 / len(others)) for n, w in others.items()}
    out = {n: math.floor((100 - percent) * s) for n, s in shares.items()}
    if out:
        first = max(shares, key=shares.__getitem__)
        out[first] += 100 - percent - sum(out.values())
    out[canary] = percent
    return out


class StateFile:
    """Route states as JSON; every change is a read-modify-write of one route under an exclusive
    lock, so workers changing different routes (or the same one) never lose each other's writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(f".{path.name}.lock")

    def load(self) -> dict[str, RouteState]:
        """The saved states; an unreadable or malformed file counts as empty (and is logged by the caller)."""
        try:
            raw = json.loads(self.path.read_text())
            return {name: RouteState(weights_override=s.get("weights_override"), active=s.get("active"),
                                     rollout=RolloutStatus(**s["rollout"]) if s.get("rollout") else None,
                                     versions=s.get("versions"), spec_hash=s.get("spec_hash", ""))
                    for name, s in raw.items()}
        except FileNotFoundError:
            return {}

    def update(self, model: str, change: Callable[[RouteState], RouteState]) -> dict[str, RouteState]:
        """Apply change to one route's saved state, atomically across processes; all states after."""
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            states = self.load()
            states[model] = change(states.get(model) or RouteState())
            self._write(states)
        return states

    def replace(self, states: dict[str, RouteState]) -> None:
        """Write these states whole (after a reload dropped stale ones)."""
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._write(states)

    def _write(self, states: dict[str, RouteState]) -> None:
        doc = {name: asdict(s) for name, s in states.items() if not s.is_empty()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


class TargetStats:
    """Recent outcomes of one target (bounded): what rollout gates compare."""

    def __init__(self, size: int = 8192) -> None:
        self._events: deque[tuple[float, float, bool]] = deque(maxlen=size)

    def record(self, ok: bool, seconds: float) -> None:
        self._events.append((time.monotonic(), seconds, ok))

    def window(self, since: float) -> tuple[int, float, float]:
        """(requests, error rate, p99 latency in seconds) of outcomes at or after `since` (monotonic)."""
        recent = [(s, ok) for t, s, ok in self._events if t >= since]
        if not recent:
            return 0, 0.0, 0.0
        latencies = sorted(s for s, _ in recent)
        errors = sum(1 for _, ok in recent if not ok)
        return len(recent), errors / len(recent), latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
