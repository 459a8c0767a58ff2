"""The admin listener: Prometheus metrics and the gateway's own liveness and readiness."""
from __future__ import annotations

from typing import Callable

from aiohttp import web

from gateway.observability.metrics import exposition


def app(is_ready: Callable[[], bool]) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def live(request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def ready(request: web.Request) -> web.Response:
        ok = is_ready()
        return web.Response(text="ready\n" if ok else "not ready\n", status=200 if ok else 503)

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/live", live)
    application.router.add_get("/ready", ready)
    return application
