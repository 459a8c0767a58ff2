"""The live route table: built from the routing file plus the state file, rebuilt when either
changes (polled, so ConfigMap symlink swaps count too), on SIGHUP, or after an admin or rollout
change. A bad routing file is rejected with file:line:reason and the old table stays in force."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Mapping

from gateway import config
from gateway.backends.triton import TritonBackend
from gateway.drift.monitor import DriftHub
from gateway.observability.metrics import Metrics
from gateway.outcomes.hub import OutcomeHub
from gateway.resilience.breaker import PerTarget
from gateway.resilience.leases import SharedBuckets
from gateway.routing.state import RouteState, StateFile, TargetStats, signature, spec_hash
from gateway.routing.table import RouteTable, compile_routes

log = logging.getLogger(__name__)


class LiveRouting:
    """Owns the current RouteTable and hands each new one to `on_swap` (the dataplane)."""

    def __init__(self, loaded: config.Loaded, backends: Mapping[str, TritonBackend], metrics: Metrics,
                 on_swap: Callable[[RouteTable], None], drift: DriftHub | None = None,
                 shared: SharedBuckets | None = None, outcomes: OutcomeHub | None = None) -> None:
        self.gateway = loaded.gateway
        self.routing_path = loaded.routing_path
        self.backends = backends
        self.metrics = metrics
        self.state_file = StateFile(loaded.state_path)
        self.stats: dict[tuple[str, str], TargetStats] = {}
        self.kept = PerTarget(metrics.breaker)
        self.drift = drift
        self.shared = shared  # global rate limits' buckets in Redis
        self.outcomes = outcomes
        self._on_swap = on_swap
        # Signatures first, then the reads: an edit in between is seen as a change.
        self._seen = (signature(self.routing_path), signature(self.state_file.path))
        routing = config.load_routing(self.routing_path, self.gateway)
        self.states = self._current(routing, self._saved())
        self.table = self._build(routing)

    def _build(self, routing: config.RoutingConfig) -> RouteTable:
        table = compile_routes(routing, self.backends, self.states, self.stats, self.kept, self.drift, self.shared,
                               self.outcomes)
        self.table = table
        self._on_swap(table)
        self.metrics.route_weights(table)
        log.info("routing version %s in force", table.version)  # audit records name it as config_version
        return table

    def _saved(self) -> dict[str, RouteState]:
        try:
            return self.state_file.load()
        except (OSError, ValueError, TypeError) as e:
            log.error("state file %s is unreadable (%s); running without runtime overrides", self.state_file.path, e)
            return {}

    @staticmethod
    def _current(routing: config.RoutingConfig, states: dict[str, RouteState]) -> dict[str, RouteState]:
        """Only states made for the route entries in force: an edited (or removed) route loses its overrides."""
        hashes = {name: spec_hash(spec) for name, spec in routing.models.items()}
        return {name: s for name, s in states.items() if hashes.get(name) == s.spec_hash}

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
        self.states = self._current(routing, self._saved())
        self._build(routing)
        self.metrics.reload("ok")
        log.info("routing reloaded (%s): %d models; changed: %s", reason, len(routing.models), ", ".join(changed) or "none")
        return True

    def update(self, model: str, change: Callable[[RouteState], RouteState]) -> None:
        """Change one route's live state (admin calls, rollout steps), persist it, and apply it;
        every worker follows. `change` may raise to refuse; nothing is written then."""
        spec = self.table.routes[model].spec

        def stamped(state: RouteState) -> RouteState:
            if state.spec_hash != spec_hash(spec):
                state = RouteState()  # a leftover from an earlier entry of this route
            new = change(state)
            new.spec_hash = spec_hash(spec)
            return new

        self.states = self._current(self.table.config, self.state_file.update(model, stamped))
        self._seen = (self._seen[0], signature(self.state_file.path))
        self._build(self.table.config)

    async def watch(self, interval_s: float = 0.25) -> None:
        """Poll both files' signatures; reload on change. Never dies: a failure is logged and retried."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                seen = (signature(self.routing_path), signature(self.state_file.path))
                if seen == self._seen:
                    continue
                routing_changed = seen[0] != self._seen[0]
                self._seen = seen
                if routing_changed:
                    self.reload()
                else:
                    self.states = self._current(self.table.config, self._saved())
                    self._build(self.table.config)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad file
                log.exception("routing watch failed; the previous routes stay in force")
                self.metrics.reload("rejected")
