"""The immutable route table: public model name -> targets, with every per-request decision
precomputed at config load (the bytes that rename a request for its target and the answer back,
the weight split, pins, stickiness, the blue-green switch, shadows, timeouts, fallback rules).

A reload, an admin change or a rollout step builds a new table and swaps one reference.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

from gateway.backends.triton import TritonBackend
from gateway.config import Compare, Route as RouteSpec, RoutingConfig
from gateway.drift.monitor import DriftHub, RouteDrift
from gateway.errors import NotFound
from gateway.fallback import RuleSet
from gateway.outcomes.hub import OutcomeHub
from gateway.outcomes.recorder import Recorder
from gateway.resilience.breaker import Breaker, PerTarget
from gateway.resilience.caps import Cap
from gateway.resilience.leases import SharedBuckets
from gateway.resilience.limits import Limit, Limits
from gateway.protocol.wire import override, parameter_text, pb
from gateway.routing.split import Split
from gateway.routing.state import RouteState, TargetStats
from gateway.security.access import Policy
from gateway.validation import Schemas


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """One backend model version a route can send to."""

    name: str
    backend: TritonBackend
    model: str
    version: str            # "" lets the client (or Triton's version policy) choose
    weight: int             # the live weight (file, overridden by admin or rollout)
    timeout_s: float        # the route's timeout_s, else this target's backend's request_timeout_s
    name_suffix: bytes      # appended to a request: sets the backend's model name
    default_suffix: bytes   # the same plus this target's version, for requests naming none
    response_suffix: bytes  # appended to an answer: restores the public model name
    stats: TargetStats      # outcomes the rollout gates read; survives reloads
    breaker: Breaker | None  # the route's circuit breaker for this target; survives reloads
    cap: Cap | None          # the route's concurrency cap for this target; survives reloads


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    target: Target
    rate: float
    compare: Compare


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes, why, and the bytes to append to it."""

    target: Target
    reason: str             # version | pin | active | sticky | weight
    suffix: bytes


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One public model and the rules that pick a target for each request."""

    public: str
    spec: RouteSpec
    targets: dict[str, Target]
    split: Split[Target]
    active: Target | None
    pins: tuple[tuple[str, str, Target], ...]
    sticky_header: str | None
    sticky_parameter: str | None
    shadows: tuple[ShadowTarget, ...]
    tracks_outcomes: bool                 # a rollout reads per-target outcomes: record them
    fallback: RuleSet | None = None
    bucket: Limit | None = None           # this model's rate limit
    limited: bool = False                 # any rate limit applies (model, client or global)
    validation: Schemas | None = None     # edge checks, compiled per target from Triton's schema + YAML
    drift: RouteDrift | None = None       # inline drift monitors of the targets with a profile
    outcomes: Recorder | None = None      # remembers answers that posted outcomes join to
    by_version: dict[str, Target] = field(default_factory=dict)

    def decide(self, version: str, headers: Mapping[str, str], request: pb.ModelInferRequest | None) -> Decision:
        """Pick the target: an explicit version, then header pins, then the blue-green switch,
        then the sticky key, then the weights."""
        if version:
            target = self.by_version.get(version) or self.by_version.get("")
            if target is None:
                raise NotFound(f"Request for unknown model: '{self.public}' version {version} is not found")
            return Decision(target, "version", target.name_suffix)
        for header, value, target in self.pins:
            if headers.get(header) == value:
                return Decision(target, "pin", target.default_suffix)
        if self.active is not None:
            return Decision(self.active, "active", self.active.default_suffix)
        key = self._sticky_key(headers, request)
        if key:
            target = self.split.pick_sticky(key)
            return Decision(target, "sticky", target.default_suffix)
        target = self.split.pick()
        return Decision(target, "weight", target.default_suffix)

    def _sticky_key(self, headers: Mapping[str, str], request: pb.ModelInferRequest | None) -> str:
        if self.sticky_header is not None:
            return headers.get(self.sticky_header, "")
        if self.sticky_parameter is not None:
            return parameter_text(request, self.sticky_parameter)
        return ""

    def serving(self, target: Target) -> int:
        """The percentage of traffic (without pins, versions or stickiness) this target gets now."""
        if self.active is not None:
            return 100 if self.active is target else 0
        return target.weight

    def default_target(self) -> Target:
        """The target metadata calls describe: the blue-green active one, else the heaviest."""
        return self.active or max(self.targets.values(), key=lambda t: t.weight)


class RouteTable:
    """All published models, the limits across them and the access rules; `resolve` is the only
    route lookup on the request path."""

    def __init__(self, routes: Mapping[str, Route], config: RoutingConfig, limits: Limits) -> None:
        self.routes = dict(routes)
        self.config = config
        self.limits = limits
        self.access = Policy(config.access)
        self.version = _version(config, self.routes)

    def resolve(self, public: str) -> Route:
        route = self.routes.get(public)
        if route is None:
            raise NotFound(f"Request for unknown model: '{public}' is not found")
        return route


def _version(config: RoutingConfig, routes: Mapping[str, Route]) -> str:
    """12 hex digits naming the routing in force (the file's content, the live weights and
    blue-green switches): audit records say which one decided."""
    live = sorted((r.public, t.name, t.weight, r.active is t) for r in routes.values() for t in r.targets.values())
    return hashlib.sha256(config.model_dump_json().encode() + repr(live).encode()).hexdigest()[:12]


def compile_routes(config: RoutingConfig, backends: Mapping[str, TritonBackend],
                   states: Mapping[str, RouteState], stats: dict[tuple[str, str], TargetStats],
                   kept: PerTarget | None = None, drift: DriftHub | None = None,
                   shared: SharedBuckets | None = None, outcomes: OutcomeHub | None = None) -> RouteTable:
    """Build the table from the file's routes and the live state (admin overrides, rollout steps).
    config.load has already checked every reference."""
    limits = Limits(config.limits.global_, config.limits.per_client, shared)
    kept = kept or PerTarget()
    routes = {}
    for public, spec in config.models.items():
        state = states.get(public) or RouteState()
        named = spec.named_targets()
        weights = state.weights(spec)
        targets = {}
        for name, t in named.items():
            renamed = t.model != public
            model_name = t.model if renamed else ""
            version = (state.versions or {}).get(name, t.version)  # a version proposed at runtime wins
            targets[name] = Target(
                name=name, backend=backends[t.backend], model=t.model, version=version, weight=weights[name],
                timeout_s=spec.timeout_s or backends[t.backend].config.request_timeout_s,
                name_suffix=override(pb.ModelInferRequest, model_name=model_name),
                default_suffix=override(pb.ModelInferRequest, model_name=model_name, model_version=version),
                response_suffix=override(pb.ModelInferResponse, model_name=public if renamed else ""),
                stats=stats.setdefault((public, name), TargetStats()),
                breaker=kept.breaker(public, name, spec.breaker),
                cap=kept.cap(public, name, spec.concurrency),
            )
        # an admin flip wins; admin weights switch the file's blue-green off; unknown names are ignored
        active_name = state.active if state.active in targets else None if state.overrides_weights(spec) else spec.active
        by_version = {t.version: t for t in targets.values()}
        routes[public] = Route(
            public=public,
            spec=spec,
            targets=targets,
            split=Split([(t, t.name, t.weight) for t in targets.values()]),
            active=targets[active_name] if active_name else None,
            pins=tuple((p.header.lower(), p.value, targets[p.target]) for p in spec.match),
            sticky_header=spec.sticky.header.lower() if spec.sticky and spec.sticky.header else None,
            sticky_parameter=spec.sticky.parameter if spec.sticky else None,
            shadows=tuple(ShadowTarget(targets[s.target], s.rate, s.compare) for s in spec.shadows),
            tracks_outcomes=spec.rollout is not None,
            fallback=RuleSet(spec.fallback) if spec.fallback else None,
            bucket=limits.model(public, spec.rate_limit),
            limited=limits.applies(spec.rate_limit),
            validation=Schemas(spec.validation) if spec.validation else None,
            drift=drift.route(public, spec.drift, {n: (t.backend, t.model, t.version) for n, t in targets.items()})
            if spec.drift and drift else None,
            outcomes=outcomes.recorder(public, spec.outcomes) if spec.outcomes and outcomes else None,
            by_version=by_version,
        )
    if drift is not None:
        drift.retain({m.key for r in routes.values() if r.drift for m in r.drift.by_target.values()})
    return RouteTable(routes, config, limits)
