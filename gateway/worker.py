"""One gateway process: builds backends, routes and frontends from a loaded config, serves until
SIGTERM or SIGINT, then drains (stops accepting, lets in-flight requests finish) and returns."""
from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from gateway.backends.triton import TritonBackend
from gateway.config import Loaded
from gateway.dataplane import DataPlane
from gateway.frontends import admin
from gateway.frontends import grpc as grpc_frontend
from gateway.frontends.http import HttpFrontend
from gateway.observability.metrics import Metrics
from gateway.routing.live import LiveRouting
from gateway.routing.rollout import RolloutController
from gateway.routing.shadow import ShadowDispatcher

log = logging.getLogger(__name__)


class _Lifecycle:
    """Readiness as the listeners report it: false while starting and once draining begins."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.draining = False

    def ready(self) -> bool:
        return not self.draining and self.dataplane.ready()


async def serve(loaded: Loaded, reuse_port: bool, leader: bool) -> None:
    """Run the gateway until a stop signal, then drain within drain_timeout_s. The leader (the
    only worker, or worker 0) runs the rollout controller."""
    cfg = loaded.gateway
    metrics = Metrics()
    backends = {name: TritonBackend(name, spec, cfg.max_message_bytes, metrics.retry) for name, spec in cfg.backends.items()}
    await asyncio.gather(*(b.probe() for b in backends.values()))
    for backend in backends.values():
        backend.start()
    shadows = ShadowDispatcher(metrics)
    shadows.start()
    dataplane = DataPlane(metrics, shadows)
    live = LiveRouting(loaded, backends, metrics, dataplane.swap)
    background = [asyncio.create_task(live.watch())]
    if leader:
        controller = RolloutController(lambda: live.table, lambda: live.states, live.update)
        background.append(asyncio.create_task(controller.run()))
    lifecycle = _Lifecycle(dataplane)

    listeners = cfg.listeners
    grpc_server = grpc_frontend.server(grpc_frontend.GrpcFrontend(dataplane, lifecycle.ready),
                                      listeners.grpc.host, listeners.grpc.port, cfg.max_message_bytes, reuse_port)
    await grpc_server.start()
    runners = []
    for application, listener in ((HttpFrontend(dataplane, lifecycle.ready).app(cfg.max_message_bytes), listeners.http),
                                  (admin.app(lifecycle.ready, live), listeners.admin)):
        runner = web.AppRunner(application, access_log=None, shutdown_timeout=cfg.drain_timeout_s)
        await runner.setup()
        await web.TCPSite(runner, listener.host, listener.port, reuse_port=reuse_port,
                          shutdown_timeout=cfg.drain_timeout_s).start()
        runners.append(runner)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, live.reload, "SIGHUP")
    log.info("serving: grpc %s:%d, http %s:%d, admin %s:%d; routes: %s",
             listeners.grpc.host, listeners.grpc.port, listeners.http.host, listeners.http.port,
             listeners.admin.host, listeners.admin.port, ", ".join(sorted(live.table.routes)))
    await stop.wait()

    log.info("draining (up to %.1fs)", cfg.drain_timeout_s)
    lifecycle.draining = True
    await asyncio.gather(grpc_server.stop(cfg.drain_timeout_s), *(r.cleanup() for r in runners))
    for task in background:
        task.cancel()
    await shadows.close()
    await asyncio.gather(*(b.close() for b in backends.values()))
    log.info("stopped")
