"""The live route table: built from the routing file plus the state file, rebuilt when either
changes (polled, so ConfigMap symlink swaps count too), on SIGHUP, or after an admin or rollout
change. A bad routing file is rejected with file:line:reason and the old table stays in force."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable, Mapping

from gateway import config
from gateway.backends.triton import TritonBackend
from gateway.observability.metrics import Metrics
from gateway.routing.state import RouteState, StateFile, TargetStats
from gateway.routing.table import RouteTable, compile_routes

log = logging.getLogger(__name__)


class LiveRouting:
    """Owns the current RouteTable and hands each new one to `on_swap` (the dataplane)."""

    def __init__(self, gateway: config.GatewayConfig, routing_path: Path, backends: Mapping[str, TritonBackend],
                 metrics: Metrics, on_swap: Callable[[RouteTable], None], leader: bool) -> None:
        self.gateway = gateway
        self.routing_path = routing_path
        self.backends = backends
        self.metrics = metrics
        self.leader = leader   # the one process that persists state changes it did not make itself
        self.state_file = StateFile(routing_path)
        self.stats: dict[tuple[str, str], TargetStats] = {}
        self._on_swap = on_swap
        # Modification times first, then the reads: an edit in between is seen as a change.
        self._seen = (self._mtime(routing_path), self.state_file.mtime())
        self.states: dict[str, RouteState] = self.state_file.load()
        self.table = self._build(config.load_routing(routing_path, gateway))

    def _build(self, routing: config.RoutingConfig) -> RouteTable:
        table = compile_routes(routing, self.backends, self.states, self.stats)
        self.table = table
        self._on_swap(table)
        self.metrics.route_weights(table)
        return table

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
        self.states = {name: s for name, s in self.state_file.load().items() if name not in changed}
        if changed and self.leader:
            self._save()
        self._build(routing)
        self.metrics.reload("ok")
        log.info("routing reloaded (%s): %d models; changed: %s", reason, len(routing.models), ", ".join(changed) or "none")
        return True

    def commit(self, states: dict[str, RouteState]) -> None:
        """Apply and persist new live state (admin calls, rollout steps); every worker follows."""
        self.states = states
        self._save()
        self._build(self.table.config)

    def _save(self) -> None:
        self.state_file.save(self.states)
        self._seen = (self._seen[0], self.state_file.mtime())

    async def watch(self, interval_s: float = 0.25) -> None:
        """Poll both files' modification times; reload on change."""
        while True:
            await asyncio.sleep(interval_s)
            seen = (self._mtime(self.routing_path), self.state_file.mtime())
            if seen == self._seen:
                continue
            routing_changed = seen[0] != self._seen[0]
            self._seen = seen
            if routing_changed:
                self.reload()
            else:
                self.states = self.state_file.load()
                self._build(self.table.config)

    @staticmethod
    def _mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0.0
