"""Live routing state that is not in the routing file: admin overrides and rollout progress,
kept in a store every worker (and, with Redis, every replica) reads — a small JSON file beside the
routing file here, Redis in `gateway/shared/route_state.py` — and per-target outcome windows that
the rollout gates read."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, Literal, Protocol

from gateway.config import Route as RouteSpec
from gateway.errors import StateUnavailable

if TYPE_CHECKING:
    from gateway.shared.lease import Lease

RolloutPhase = Literal["progressing", "promoted", "rolled_back"]
Signature = tuple[int, int, int] | None   # (inode, mtime ns, size): a file changed when this does
Change = Callable[["RouteState"], "RouteState"]


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


def decode_state(doc: dict) -> RouteState:
    """One route's state from its JSON form (`dataclasses.asdict` of a RouteState)."""
    return RouteState(weights_override=doc.get("weights_override"), active=doc.get("active"),
                      rollout=RolloutStatus(**doc["rollout"]) if doc.get("rollout") else None,
                      versions=doc.get("versions"), spec_hash=doc.get("spec_hash", ""))


class StateStore(Protocol):
    """Where route states are saved and shared. Every call may block (file lock, network): the
    gateway makes them off the event loop. Failures raise StateUnavailable."""

    where: str          # for messages: the file, or the Redis server and key
    poll_s: float       # how long wait() waits at most

    def load(self) -> dict[str, RouteState]:
        """The saved states."""

    def update(self, model: str, change: Change, fence: "Lease | None" = None) -> dict[str, RouteState]:
        """Apply change to one route's saved state atomically; all states after. With a fence,
        write only while that lease is still held (else raise LostLease)."""

    def replace(self, states: dict[str, RouteState]) -> None:
        """Write these states whole."""

    def version(self) -> Hashable:
        """Cheap: a value that changes whenever the saved states do."""

    def wait(self) -> None:
        """Return on a change notice, or after poll_s at most."""


class StateFile:
    """Route states as JSON; every change is a read-modify-write of one route under an exclusive
    lock, so workers changing different routes (or the same one) never lose each other's writes.
    One gateway's workers share it; there is no leader lease to fence with (worker 0 leads)."""

    poll_s = 0.25

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"state file {path}"
        self._lock_path = path.with_name(f".{path.name}.lock")

    def load(self) -> dict[str, RouteState]:
        """The saved states; none when there is no file yet."""
        try:
            return {name: decode_state(s) for name, s in json.loads(self.path.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as e:
            raise StateUnavailable(f"{self.where} is unreadable: {e}") from e

    def update(self, model: str, change: Change, fence: "Lease | None" = None) -> dict[str, RouteState]:
        """Apply change to one route's saved state, atomically across processes; all states after."""
        with self._locked():
            states = self.load()
            states[model] = change(states.get(model) or RouteState())
            self._write(states)
        return states

    def replace(self, states: dict[str, RouteState]) -> None:
        """Write these states whole."""
        with self._locked():
            self._write(states)

    def version(self) -> Signature:
        return signature(self.path)

    def wait(self) -> None:
        time.sleep(self.poll_s)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with open(self._lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
        except OSError as e:
            raise StateUnavailable(f"cannot persist the change to {self.path}: {e}") from e

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
