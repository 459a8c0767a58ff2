"""The immutable route table: public model name -> backend target, with byte-level rewrites precomputed.

Everything a request needs (the bytes that rename the model for the backend, the bytes that
rename it back in the answer, the timeout) is computed here at config load, not per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from gateway.backends.triton import TritonBackend
from gateway.config import RoutingConfig
from gateway.errors import NotFound
from gateway.protocol.wire import override, pb


@dataclass(frozen=True, slots=True)
class Route:
    """One public model and the backend model behind it."""

    public: str
    backend: TritonBackend
    model: str
    version: str            # "" lets the client (or Triton's version policy) choose
    timeout_s: float
    name_suffix: bytes      # appended to a request: sets the backend's model name
    default_suffix: bytes   # the same plus the pinned version, for requests naming no version
    response_suffix: bytes  # appended to a response: restores the public model name

    def request_suffix(self, version: str) -> bytes:
        """Rewrite for a request asking for `version` ("" for any); NOT_FOUND if the route forbids it."""
        if not version:
            return self.default_suffix
        if self.version and version != self.version:
            raise NotFound(f"Request for unknown model: '{self.public}' version {version} is not found")
        return self.name_suffix


class RouteTable:
    """All published models; `resolve` is the only lookup on the request path."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)

    def resolve(self, public: str) -> Route:
        route = self.routes.get(public)
        if route is None:
            raise NotFound(f"Request for unknown model: '{public}' is not found")
        return route


def compile_routes(config: RoutingConfig, backends: Mapping[str, TritonBackend]) -> RouteTable:
    """Build the route table; config.load has already checked every backend reference."""
    routes = {}
    for public, spec in config.models.items():
        target = spec.target
        backend = backends[target.backend]
        renamed = target.model != public
        routes[public] = Route(
            public=public,
            backend=backend,
            model=target.model,
            version=target.version,
            timeout_s=spec.timeout_s or backend.config.request_timeout_s,
            name_suffix=override(pb.ModelInferRequest, model_name=target.model if renamed else ""),
            default_suffix=override(pb.ModelInferRequest, model_name=target.model if renamed else "",
                                    model_version=target.version),
            response_suffix=override(pb.ModelInferResponse, model_name=public if renamed else ""),
        )
    return RouteTable(routes)
