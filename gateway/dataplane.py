"""The request path, top to bottom. Frontends decode a protocol into a Call, this module decides
what happens to it, and frontends encode the answer. Later rooms (security, limits, validation,
shadows, drift, audit) slot in here, in this order, and nowhere else.

    route    = routes.resolve(call.model)          public name -> backend target (NOT_FOUND)
    payload  = call.raw + route.request_suffix()   rename for the backend, without re-encoding
    response = await backend.infer(payload)        deadline = min(client's, route's)
    metrics.observe(...)                           count and time every answer, errors too
    return response + route.response_suffix        rename back to the public model
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from gateway.errors import DeadlineExceeded, GatewayError
from gateway.observability.metrics import Metrics
from gateway.protocol.wire import pb
from gateway.routing import Route, RouteTable

UNKNOWN_MODEL = "<unknown>"  # metric label for names the routing file does not publish


@dataclass(slots=True)
class Call:
    """One inference request as the frontends hand it over."""

    model: str
    version: str
    request_id: str                     # the client's own id ("" if none): answers carry it back
    raw: bytes                          # the serialized ModelInferRequest, forwarded as is
    protocol: str                       # "grpc" or "http": a metric label
    time_remaining: float | None = None  # the client's deadline, seconds from now


class DataPlane:
    """Holds the current route table (swapped whole on reload) and runs each request through it."""

    def __init__(self, routes: RouteTable, metrics: Metrics, clock: Callable[[], float] = time.perf_counter) -> None:
        self.routes = routes
        self.metrics = metrics
        self._clock = clock

    async def infer(self, call: Call) -> bytes:
        """Forward one request; returns the serialized ModelInferResponse named as the client asked."""
        start = self._clock()
        model = UNKNOWN_MODEL
        code = "OK"
        try:
            route = self.routes.resolve(call.model)
            model = route.public
            payload = call.raw + route.request_suffix(call.version)
            response = await route.backend.infer(payload, _timeout(route, call.time_remaining), call.request_id)
            return response + route.response_suffix
        except GatewayError as e:
            code = e.code.name
            raise
        finally:
            self.metrics.observe(model, call.protocol, code, self._clock() - start)

    # ---- the metadata side of the protocol: resolve the route, ask its backend, rename back

    def model_request(self, model: str, version: str) -> tuple[Route, str]:
        """The route for a public model and the backend version to ask for."""
        route = self.routes.resolve(model)
        route.request_suffix(version)  # NOT_FOUND for a version the route does not serve
        return route, version or route.version

    async def model_metadata(self, model: str, version: str) -> pb.ModelMetadataResponse:
        route, version = self.model_request(model, version)
        answer = pb.ModelMetadataResponse()
        answer.CopyFrom(await route.backend.cached("ModelMetadata", route.model, version))
        answer.name = route.public
        if route.version:
            answer.versions[:] = [route.version]
        return answer

    async def model_config(self, model: str, version: str) -> pb.ModelConfigResponse:
        route, version = self.model_request(model, version)
        answer = pb.ModelConfigResponse()
        answer.CopyFrom(await route.backend.cached("ModelConfig", route.model, version))
        answer.config.name = route.public
        return answer

    async def model_ready(self, model: str, version: str) -> bool:
        route, version = self.model_request(model, version)
        try:
            answer = await route.backend.call("ModelReady", pb.ModelReadyRequest(name=route.model, version=version))
        except GatewayError:
            return False
        return bool(answer.ready)

    async def model_statistics(self, model: str, version: str) -> pb.ModelStatisticsResponse:
        """Statistics for one public model, or for every published one when model is empty."""
        routes = [self.model_request(model, version)] if model else [(r, r.version) for r in self.routes.routes.values()]
        answer = pb.ModelStatisticsResponse()
        for route, v in routes:
            stats = await route.backend.call("ModelStatistics", pb.ModelStatisticsRequest(name=route.model, version=v))
            for entry in stats.model_stats:
                entry.name = route.public
                answer.model_stats.append(entry)
        return answer

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        """The published models as Triton lists them: public names, the versions each route serves."""
        answer = pb.RepositoryIndexResponse()
        indexes: dict[Any, Any] = {}
        for route in self.routes.routes.values():
            if route.backend not in indexes:
                indexes[route.backend] = await route.backend.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready_only))
            for entry in indexes[route.backend].models:
                if entry.name == route.model and (not route.version or entry.version == route.version):
                    answer.models.add(name=route.public, version=entry.version, state=entry.state, reason=entry.reason)
        return answer

    def ready(self) -> bool:
        """Ready while every backend a route uses answered its last health probe."""
        return all(route.backend.healthy for route in self.routes.routes.values())


def _timeout(route: Route, client_remaining: float | None) -> float:
    """The backend call's timeout: the route's, or the client's deadline when that is sooner."""
    if client_remaining is None:
        return route.timeout_s
    if client_remaining <= 0:
        raise DeadlineExceeded("Deadline Exceeded")
    return min(client_remaining, route.timeout_s)

