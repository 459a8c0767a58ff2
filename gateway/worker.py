"""One gateway process: builds backends, routes and frontends from a loaded config, serves until
SIGTERM or SIGINT, then drains (stops accepting, lets in-flight requests finish) and returns."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from gateway.audit.trail import Auditor
from gateway.backends.triton import TritonBackend
from gateway.config import Loaded
from gateway.dataplane import DataPlane
from gateway.drift.monitor import DriftHub
from gateway.drift.replicas import ReplicaMerge
from gateway.frontends import admin
from gateway.frontends import grpc as grpc_frontend
from gateway.frontends.http import HttpFrontend
from gateway.observability.metrics import Metrics
from gateway.outcomes.hub import OutcomeHub
from gateway.outcomes.watch import RetrainWatch
from gateway.resilience.leases import SharedBuckets
from gateway.routing.live import LiveRouting
from gateway.routing.rollout import RolloutController
from gateway.routing.shadow import ShadowDispatcher
from gateway.security.identity import Authenticator
from gateway.security.jwt import JwtVerifier
from gateway.security.tls import ListenerTls, channel_credentials
from gateway.shared.link import RedisLink
from gateway.shared.route_state import open_shared

log = logging.getLogger(__name__)


class _Lifecycle:
    """Readiness as the listeners report it: false while starting and once draining begins."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.draining = False

    def ready(self) -> bool:
        return not self.draining and self.dataplane.ready()


def _shared_dir() -> Path | None:
    """Where workers exchange drift counts: the supervisor's metrics directory (None: one worker)."""
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(shared) if shared else None


async def serve(loaded: Loaded, reuse_port: bool, leader: bool, index: int = 0) -> None:
    """Run the gateway until a stop signal, then drain within drain_timeout_s. The leader (the
    only worker, or worker 0) runs the rollout controller — with route state in Redis, it decides
    only while it holds the leader lease; worker `index` writes audit stream w<index>."""
    cfg = loaded.gateway
    base = loaded.gateway_path.parent
    metrics = Metrics()
    audit = Auditor(cfg.audit, base, f"w{index}", metrics) if cfg.audit else None
    if audit is not None:
        await asyncio.to_thread(audit.open)  # recovery may read a whole segment: off the loop
    backends = {name: TritonBackend(name, spec, cfg.max_message_bytes, metrics.retry,
                                    channel_credentials(spec.tls, base) if spec.tls else None)
                for name, spec in cfg.backends.items()}
    await asyncio.gather(*(b.probe() for b in backends.values()))
    for backend in backends.values():
        backend.start()
    shadows = ShadowDispatcher(metrics, audit)
    shadows.start()
    dataplane = DataPlane(metrics, shadows, audit)
    redis = RedisLink(cfg.redis, metrics.redis_error) if cfg.redis else None  # state shared across replicas
    drift = DriftHub(loaded.routing_path.parent, metrics, leader, _shared_dir(),  # its Binners JIT-compile
                     replicas=ReplicaMerge(redis) if redis and leader else None)
    outcomes = OutcomeHub(cfg.outcomes, base, metrics.outcomes) if cfg.outcomes else None
    store, lease = open_shared(cfg, leader)
    live = LiveRouting(loaded, backends, metrics, dataplane.swap, drift, store,
                       shared=SharedBuckets(redis, metrics.limit_decided_without_redis) if redis else None,
                       outcomes=outcomes)
    background = [asyncio.create_task(live.watch()), asyncio.create_task(live.follow()),
                  asyncio.create_task(drift.run(lambda: {r.public: r.spec.drift for r in live.table.routes.values()
                                                         if r.spec.drift is not None}))]
    keeper = None
    if leader:
        controller = RolloutController(lambda: live.table, lambda: live.states,
                                       lambda model, change: live.update(model, change, fence=lease),
                                       on_event=metrics.rollout, distance=drift.distance,
                                       outcomes=outcomes.arms if outcomes else None,
                                       on_test=outcomes.reported if outcomes else None,
                                       leads=(lambda: lease.held) if lease is not None else (lambda: True))
        background.append(asyncio.create_task(controller.run()))
        if outcomes is not None:
            retrain = RetrainWatch(outcomes, drift.alerts, loaded.routing_path.parent,
                                   audit.event if audit is not None else None, controller.leads)
            background.append(asyncio.create_task(retrain.run(lambda: live.table.routes.values())))
        if lease is not None:
            keeper = asyncio.create_task(lease.keep(metrics.leading))
        metrics.leading(lease is None)
    lifecycle = _Lifecycle(dataplane)
    jwt = JwtVerifier(cfg.auth.jwt, base) if cfg.auth.jwt else None
    if jwt is not None:
        await jwt.start()
    authenticator = Authenticator(jwt)
    tls = ListenerTls(cfg.tls, base, metrics.tls_reload) if cfg.tls else None
    if tls is not None:
        background.append(asyncio.create_task(tls.watch()))
    on_tls = (lambda name: tls is not None and name in tls.spec.listeners)

    listeners = cfg.listeners
    grpc_server = grpc_frontend.server(
        grpc_frontend.GrpcFrontend(dataplane, lifecycle.ready, authenticator,
                                   peer_certs=on_tls("grpc") and tls.spec.client_auth != "none"),
        listeners.grpc.host, listeners.grpc.port, cfg.max_message_bytes, reuse_port,
        tls.grpc_credentials() if on_tls("grpc") else None)
    await grpc_server.start()
    runners = []
    for name, application, listener in (
            ("http", HttpFrontend(dataplane, lifecycle.ready, authenticator).app(cfg.max_message_bytes), listeners.http),
            ("admin", admin.app(lifecycle.ready, live, authenticator, dataplane.authorize), listeners.admin)):
        runner = web.AppRunner(application, access_log=None, shutdown_timeout=cfg.drain_timeout_s)
        await runner.setup()
        await web.TCPSite(runner, listener.host, listener.port, reuse_port=reuse_port, shutdown_timeout=cfg.drain_timeout_s,
                          ssl_context=tls.http_context() if on_tls(name) else None).start()
        runners.append(runner)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, live.reload, "SIGHUP")
    log.info("serving: grpc %s:%d, http %s:%d, admin %s:%d%s; routes: %s",
             listeners.grpc.host, listeners.grpc.port, listeners.http.host, listeners.http.port,
             listeners.admin.host, listeners.admin.port, f" (TLS on {', '.join(tls.spec.listeners)})" if tls else "",
             ", ".join(sorted(live.table.routes)))
    if live.table.config.access is None:
        log.warning("routing file has no 'access' rules: inference and metadata are open to any caller, the admin API is closed")
    await stop.wait()

    log.info("draining (up to %.1fs)", cfg.drain_timeout_s)
    lifecycle.draining = True
    if keeper is not None and lease is not None:
        keeper.cancel()
        await lease.hand_over()
    await asyncio.gather(grpc_server.stop(cfg.drain_timeout_s), *(r.cleanup() for r in runners))
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)  # each task's own cleanup runs (retrain webhooks)
    await shadows.close()
    if audit is not None:
        await asyncio.to_thread(audit.close, cfg.drain_timeout_s)  # the last records, fsynced and sealed
    if outcomes is not None:
        await asyncio.to_thread(outcomes.close)  # predictions still queued are written
    if jwt is not None:
        await jwt.close()
    await asyncio.gather(*(b.close() for b in backends.values()))
    if redis is not None:
        await redis.close()
    log.info("stopped")
