"""The live route table: built from the routing file plus the saved route states, rebuilt when
the routing file changes (polled, so ConfigMap symlink swaps count too), on SIGHUP, when the state
store says its states changed (another worker or replica wrote them), or after an admin or rollout
change. A bad routing file is rejected with file:line:reason and the old table stays in force; an
unreachable state store keeps the last known states in force."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable, Hashable, Mapping

from gateway import config
from gateway.backends.triton import TritonBackend
from gateway.drift.monitor import DriftHub
from gateway.errors import StateUnavailable
from gateway.observability.metrics import Metrics
from gateway.outcomes.hub import OutcomeHub
from gateway.resilience.breaker import PerTarget
from gateway.resilience.leases import SharedBuckets
from gateway.routing.state import Change, RouteState, StateFile, StateStore, TargetStats, signature, spec_hash
from gateway.routing.table import RouteTable, compile_routes

if TYPE_CHECKING:
    from gateway.shared.lease import Lease

log = logging.getLogger(__name__)


class LiveRouting:
    """Owns the current RouteTable and hands each new one to `on_swap` (the dataplane). The state
    store (default: the state file) is read and written off the event loop."""

    def __init__(self, loaded: config.Loaded, backends: Mapping[str, TritonBackend], metrics: Metrics,
                 on_swap: Callable[[RouteTable], None], drift: DriftHub | None = None,
                 store: StateStore | None = None, shared: SharedBuckets | None = None,
                 outcomes: OutcomeHub | None = None) -> None:
        self.gateway = loaded.gateway
        self.routing_path = loaded.routing_path
        self.backends = backends
        self.metrics = metrics
        self.store = store or StateFile(loaded.state_path)
        self.stats: dict[tuple[str, str], TargetStats] = {}
        self.kept = PerTarget(metrics.breaker)
        self.drift = drift
        self.shared = shared  # global rate limits' buckets in Redis
        self.outcomes = outcomes
        self._on_swap = on_swap
        # Signatures and versions first, then the reads: an edit in between is seen as a change.
        self._routing_seen = signature(self.routing_path)
        self._saved: dict[str, RouteState] = {}   # the store's states as last read, for every route entry
        self._state_seen: Hashable = None
        self._reachable = True
        try:
            self._state_seen = self.store.version()
            self._saved = self.store.load()
        except StateUnavailable as e:
            self._store_failed("load", e)
        routing = config.load_routing(self.routing_path, self.gateway)
        self.states = self._current(routing, self._saved)
        self.table = self._build(routing)
        self.metrics.route_state_up(self._reachable)

    def _build(self, routing: config.RoutingConfig) -> RouteTable:
        table = compile_routes(routing, self.backends, self.states, self.stats, self.kept, self.drift, self.shared,
                               self.outcomes)
        self.table = table
        self._on_swap(table)
        self.metrics.route_weights(table)
        log.info("routing version %s in force", table.version)  # audit records name it as config_version
        return table

    @staticmethod
    def _current(routing: config.RoutingConfig, states: dict[str, RouteState]) -> dict[str, RouteState]:
        """Only states made for the route entries in force: an edited (or removed) route loses its overrides."""
        hashes = {name: spec_hash(spec) for name, spec in routing.models.items()}
        return {name: s for name, s in states.items() if hashes.get(name) == s.spec_hash}

    def _apply(self, saved: dict[str, RouteState]) -> None:
        """Take these saved states; rebuild the table if the ones in force change."""
        self._saved = saved
        states = self._current(self.table.config, saved)
        if states != self.states:
            self.states = states
            self._build(self.table.config)

    def reload(self, reason: str = "file changed") -> bool:
        """Re-read the routing file; on any problem keep the current table and say why."""
        try:
            routing = config.load_routing(self.routing_path, self.gateway)
        except config.ConfigError as e:
            log.error("routing reload (%s) rejected; the previous routes stay in force:\n%s", reason, e)
            self.metrics.reload("rejected")
            return False
        old = self.table.config.models
        changed = [name for name, spec in routing.models.items() if old.get(name) != spec]
        self.states = self._current(routing, self._saved)
        self._build(routing)
        self.metrics.reload("ok")
        log.info("routing reloaded (%s): %d models; changed: %s", reason, len(routing.models), ", ".join(changed) or "none")
        return True

    async def update(self, model: str, change: Change, fence: Lease | None = None) -> None:
        """Change one route's live state (admin calls, rollout steps), persist it, and apply it;
        every worker and replica follows. `change` may raise to refuse; nothing is written then.
        An unreachable store raises StateUnavailable (counted, logged); fence: see StateStore."""
        spec = self.table.routes[model].spec

        def stamped(state: RouteState) -> RouteState:
            if state.spec_hash != spec_hash(spec):
                state = RouteState()  # a leftover from an earlier entry of this route
            new = change(state)
            new.spec_hash = spec_hash(spec)
            return new

        try:
            saved = await asyncio.to_thread(self.store.update, model, stamped, fence)
        except StateUnavailable as e:
            self._store_failed("update", e)
            log.error("change of route %s refused: %s", model, e)
            raise StateUnavailable(f"change of route {model!r} refused, the route state in force stays: {e}") from e
        self._apply(saved)

    async def watch(self, interval_s: float = 0.25) -> None:
        """Poll the routing file's signature; reload on change. Never dies: a failure is logged and retried."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                seen = signature(self.routing_path)
                if seen != self._routing_seen:
                    self._routing_seen = seen
                    self.reload()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad file
                log.exception("routing watch failed; the previous routes stay in force")
                self.metrics.reload("rejected")

    async def follow(self) -> None:
        """Apply the saved states whenever the store's version changes (checked after each change
        notice or poll); reload everything once the store answers again after an outage. Never dies."""
        while True:
            await asyncio.to_thread(self.store.wait)
            try:
                version = await asyncio.to_thread(self.store.version)
                if version != self._state_seen or not self._reachable:
                    saved = await asyncio.to_thread(self.store.load)
                    self._state_seen = version
                    if not self._reachable:
                        log.info("%s answers again; its route states are in force", self.store.where)
                    self._reachable = True
                    self.metrics.route_state_up(True)
                    self._apply(saved)
            except StateUnavailable as e:
                self._store_failed("load", e)
            except Exception:  # noqa: BLE001 - the follower must outlive any one bad read
                log.exception("following %s failed; the last known route states stay in force", self.store.where)

    def _store_failed(self, op: str, e: StateUnavailable) -> None:
        """Count a failed load or update; a failed load marks the store unreachable (said once per outage)."""
        self.metrics.route_state_error(op)
        if op == "load":
            if self._reachable:
                log.error("%s; the last known route states stay in force, changes are refused until it answers", e)
            self._reachable = False
            self.metrics.route_state_up(False)
