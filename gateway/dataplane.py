"""The request path, top to bottom. Frontends decode a protocol into a Call (with the caller's
principal, from a verified client certificate or bearer token, and its W3C trace context), this
module decides what happens to it, and frontends encode the answer. Every room takes its turn
here, in this order, and nowhere else.

    audit.admit()                                     fail_closed policy and a full audit queue: UNAVAILABLE
    access.check(principal, model, "infer")         access rules (UNAUTHENTICATED / PERMISSION_DENIED)
    route    = routes.resolve(call.model)             public name -> route (NOT_FOUND)
    check_layout(request)                             tensor bytes agree with shapes (INVALID_ARGUMENT)
    limits.admit(client, model)                       rate limits: model, client (principal), global (RESOURCE_EXHAUSTED)
    decision = route.decide(version, headers, ...)    version, pin, blue-green, sticky or weight
    validator.check(request)                          the target's schema and the route's value rules
                                                      (INVALID_ARGUMENT, or counted only in observe mode)
    response = await _send(target, ...)               through the target's cap and breaker; raw bytes + rename,
                                                      deadline = min(client's, route's), traceparent passed on
      on UNAVAILABLE / NOT_FOUND / DEADLINE_EXCEEDED:  route.fallback.answer(...), marked degraded
    stats / metrics                                   per-target outcomes for rollout gates; counters, latency
    audit.infer(call, outcome)                        queue the request's record, every outcome (never blocks)
    monitor.record(request, response)                 inline drift: bin inputs and outputs (numba)
    outcomes.remember(...)                            queue what a later outcome joins to (never blocks)
    shadows.offer(...)                                sampled shadows run after the answer, off this path
    return response + target.response_suffix          renamed back to the public model

Posted outcomes (`feedback`) take the same access rules (action "feedback"), the route's
outcome recorder joins them to the remembered predictions, and each post is audited (who posted
how many outcomes, with what fates).
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import grpc

from gateway.audit.trail import Auditor
from gateway.backends.triton import Metadata
from gateway.errors import (DeadlineExceeded, FailedPrecondition, GatewayError, PermissionDenied, ResourceExhausted,
                            Unauthenticated)
from gateway.observability.metrics import Metrics
from gateway.observability.trace import Trace, current as current_trace
from gateway.outcomes.feedback import Status
from gateway.outcomes.records import Feedback
from gateway.protocol.tensors import check_layout
from gateway.protocol.wire import pb
from gateway.routing.shadow import ShadowDispatcher
from gateway.routing.table import Route, RouteTable, Target
from gateway.security.principal import Principal

UNKNOWN = "<unknown>"  # metric label for names the routing file does not publish
# Codes that say the request was bad, not the target: they do not count against a canary.
_CLIENT_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED})
# Backend failures a route's fallback rules answer for: down or not ready, model missing, too slow.
_FALLBACK_ON = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED})
FALLBACK_TARGET = "fallback"  # the target name a rule-engine answer reports


@dataclass(slots=True)
class Call:
    """One inference request as the frontends hand it over."""

    model: str
    version: str
    request_id: str                     # the client's own id ("" if none): answers carry it back
    raw: bytes                          # the serialized ModelInferRequest, forwarded as is
    protocol: str                       # "grpc" or "http": a metric label
    client: str                         # the caller's address
    headers: Mapping[str, str]          # gRPC metadata or HTTP headers, lower-case names
    request: pb.ModelInferRequest       # the parsed form: parameters, tensors to validate
    trace: Trace                         # the caller's trace (or a new one) and the gateway's span in it
    time_remaining: float | None = None  # the client's deadline, seconds from now
    principal: Principal | None = None   # who is calling (None: no credentials)


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in as it goes: metric labels and the audit record."""

    model: str = UNKNOWN
    target: str = UNKNOWN
    version: str = ""
    decision: str = ""          # version | pin | active | sticky | weight (routing.table.Decision)
    validation: str = "not_checked"  # passed | observed:<rule> | rejected:<rule>
    code: str = "OK"
    message: str = ""           # the error answered, if any
    fallback: str = ""          # the rule(s) that answered instead of the model
    response: bytes = b""       # the answer as the backend (or the rules) gave it
    config_version: str = ""


@dataclass(frozen=True, slots=True)
class Answer:
    raw: bytes          # the serialized ModelInferResponse, named as the client asked
    target: str         # the route target that served it (a response header / trailer)
    fallback: str = ""  # the fallback rule(s) that answered instead of the model: a degraded answer


class DataPlane:
    """Holds the current route table (swapped whole on reload) and runs each request through it."""

    def __init__(self, metrics: Metrics, shadows: ShadowDispatcher, audit: Auditor | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.routes: RouteTable | None = None
        self.metrics = metrics
        self.shadows = shadows
        self.audit = audit
        self._clock = clock

    def swap(self, routes: RouteTable) -> None:
        """Install a new route table; requests already running finish on the old one."""
        self.routes = routes

    async def infer(self, call: Call) -> Answer:
        """Forward one request to the target its route picks."""
        start = self._clock()
        audit = self.audit
        if audit is not None:
            audit.admit()
        current_trace.set(call.trace)  # log lines written while this request runs carry its trace id
        done = Outcome()
        route: Route | None = None
        target: Target | None = None
        in_flight = None
        try:
            routes = self.routes
            done.config_version = routes.version
            self.authorize(call.principal, call.model, "infer")
            route = routes.resolve(call.model)
            done.model = route.public
            in_flight = self.metrics.enter(done.model)
            check_layout(call.request)
            if route.limited:
                client = call.principal.name if call.principal is not None else call.client
                await routes.limits.admit(client, done.model, route.bucket)
            decision = route.decide(call.version, call.headers, call.request)
            target = decision.target
            done.target, done.version, done.decision = target.name, target.version, decision.reason
            if route.validation is not None:
                await self._validate(route, target, call, done)
            sent = self._clock()
            try:
                response = await _send(target, call.raw + decision.suffix, _timeout(target, call.time_remaining),
                                       call.request_id, call.trace.headers())
            finally:
                self.metrics.backend(target.backend.name, done.model, self._clock() - sent)
            done.response = response
            done.version = done.version or call.version  # a version the client chose is a label once Triton has served it
        except GatewayError as e:
            done.code, done.message = e.code.name, e.message
            if isinstance(e, ResourceExhausted):
                self.metrics.limited(done.model, e.scope)
            if target is None or route is None:
                raise
            if route.tracks_outcomes and e.code not in _CLIENT_FAULTS:
                target.stats.record(False, self._clock() - start)
            if route.fallback is None or e.code not in _FALLBACK_ON:
                raise
            try:
                raw, rules = route.fallback.answer(call.request, route.public)
            except GatewayError as refusal:  # the rules cannot read this request: that is the answer
                done.code, done.message = refusal.code.name, refusal.message
                raise
            done.code, done.target, done.fallback, done.response = "OK", FALLBACK_TARGET, rules, raw
            self.metrics.fallback(done.model, rules, e.code.name)
            return Answer(raw, FALLBACK_TARGET, rules)
        except asyncio.CancelledError:
            done.code = "CANCELLED"
            raise
        except Exception:
            done.code = "INTERNAL"
            raise
        finally:
            elapsed = self._clock() - start
            if audit is not None:  # first: an admitted request's record must be queued whatever follows
                audit.infer(call, done, elapsed)
            self.metrics.observe(done.model, done.target, done.version, call.protocol, done.code, elapsed)
            if in_flight is not None:
                in_flight.dec()
        if route.tracks_outcomes:
            target.stats.record(True, self._clock() - start)
        self.metrics.sizes(done.model, call.protocol, len(call.raw), len(response))
        if route.drift is not None:
            monitor = route.drift.by_target.get(done.target)
            if monitor is not None:
                monitor.record(call.request, response, call.trace.trace_id)
        if route.outcomes is not None:
            route.outcomes.remember(call.request_id, call.trace.trace_id, done.target, done.version, done.decision,
                                    call.headers, call.request, response)
        if route.shadows:
            self.shadows.offer(route, call, target, response)
        return Answer(response + target.response_suffix, done.target)

    async def feedback(self, model: str, items: list[Feedback], principal: Principal | None) -> list[Status]:
        """Outcomes posted for earlier requests of one model, joined to what was remembered of
        them; each item's fate in order."""
        self.authorize(principal, model, "feedback")
        route = self.routes.resolve(model)
        if route.outcomes is None:
            raise FailedPrecondition(f"model '{route.public}' does not collect outcomes (its route has no 'outcomes' section)")
        statuses = await route.outcomes.post(items)
        if self.audit is not None:
            self.audit.feedback(route.public, principal.name if principal else None, Counter(s.status for s in statuses))
        return statuses

    def refused(self, trace: Trace, model: str, protocol: str, client: str, error: GatewayError,
                headers: Mapping[str, str], request_id: str = "") -> None:
        """A request the frontend could not turn into a Call (malformed, too large, or credentials
        that do not verify): it is audited too."""
        if self.audit is not None:
            self.audit.refused(trace, model, protocol, client, error, request_id, headers)

    def authorize(self, principal: Principal | None, model: str, action: str) -> None:
        """Apply the access rules in force, counting the decision per principal and model."""
        routes = self.routes
        access = routes.access
        allowed = access.rule_for(principal, model, action) is not None
        # names outside the routing file are one label: callers choose them, cardinality must not follow
        self.metrics.access(principal.name if principal else "", model if model in routes.routes else UNKNOWN, action, allowed)
        if not allowed:
            access.check(principal, model, action)

    async def _validate(self, route: Route, target: Target, call: Call, done: Outcome) -> None:
        """The route's edge checks against the target's compiled schema; a violation is refused
        (reject mode) or only counted (observe mode)."""
        schemas = route.validation
        validator = schemas.ready(target.backend, target.model, target.version) or \
            await schemas.validator(target.backend, target.model, target.version)
        violation = validator.check(call.request, len(call.raw))
        if violation is not None:
            # the client names its tensors: an unknown one is one label, cardinality must not follow
            label = UNKNOWN if violation.rule == "schema.unknown_input" else violation.input
            self.metrics.violation(route.public, label, violation.rule, schemas.spec.mode)
            done.validation = f"{'rejected' if schemas.spec.mode == 'reject' else 'observed'}:{violation.rule}"
            if schemas.spec.mode == "reject":
                raise violation.error()
        else:
            done.validation = "passed"

    # ---- the metadata side of the protocol: authorize, resolve the route, ask its backend, rename back

    def _target(self, model: str, version: str, principal: Principal | None) -> tuple[Route, Target, str]:
        """The route, the target that describes it, and the backend version to ask for."""
        self.authorize(principal, model, "metadata")
        route = self.routes.resolve(model)
        target = route.decide(version, {}, None).target if version else route.default_target()
        return route, target, version or target.version

    async def model_metadata(self, model: str, version: str, principal: Principal | None) -> pb.ModelMetadataResponse:
        route, target, version = self._target(model, version, principal)
        answer = pb.ModelMetadataResponse()
        answer.CopyFrom(await target.backend.cached("ModelMetadata", target.model, version))
        answer.name = route.public
        served = sorted({t.version for t in route.targets.values()})
        if "" not in served:
            answer.versions[:] = served
        return answer

    async def model_config(self, model: str, version: str, principal: Principal | None) -> pb.ModelConfigResponse:
        route, target, version = self._target(model, version, principal)
        answer = pb.ModelConfigResponse()
        answer.CopyFrom(await target.backend.cached("ModelConfig", target.model, version))
        answer.config.name = route.public
        return answer

    async def model_ready(self, model: str, version: str, principal: Principal | None) -> bool:
        """False, as Triton answers, for an unknown model or version too (a caller the access
        rules refuse gets their error instead)."""
        try:
            _, target, version = self._target(model, version, principal)
            answer = await target.backend.call("ModelReady", pb.ModelReadyRequest(name=target.model, version=version))
        except (Unauthenticated, PermissionDenied):
            raise
        except GatewayError:
            return False
        return bool(answer.ready)

    async def model_statistics(self, model: str, version: str, principal: Principal | None) -> pb.ModelStatisticsResponse:
        """Statistics of every target of one public model (or of all published ones the caller may see)."""
        if model:
            self.authorize(principal, model, "metadata")
        routes = [self.routes.resolve(model)] if model else self._visible(principal)
        answer = pb.ModelStatisticsResponse()
        for route in routes:
            for target in route.targets.values():
                if version and target.version and version != target.version:
                    continue
                stats = await target.backend.call(
                    "ModelStatistics", pb.ModelStatisticsRequest(name=target.model, version=version or target.version))
                for entry in stats.model_stats:
                    entry.name = route.public
                    answer.model_stats.append(entry)
        return answer

    async def repository_index(self, ready_only: bool, principal: Principal | None) -> pb.RepositoryIndexResponse:
        """The published models the caller may see, as Triton lists them: public names, the
        versions each route serves."""
        answer = pb.RepositoryIndexResponse()
        indexes: dict[Any, Any] = {}
        for route in self._visible(principal):
            for target in route.targets.values():
                if target.backend not in indexes:
                    indexes[target.backend] = await target.backend.call(
                        "RepositoryIndex", pb.RepositoryIndexRequest(ready=ready_only))
                for entry in indexes[target.backend].models:
                    if entry.name == target.model and (not target.version or entry.version == target.version):
                        answer.models.add(name=route.public, version=entry.version, state=entry.state, reason=entry.reason)
        return answer

    def _visible(self, principal: Principal | None) -> list[Route]:
        access = self.routes.access
        return [r for r in self.routes.routes.values() if access.rule_for(principal, r.public, "metadata") is not None]

    def ready(self) -> bool:
        """Ready while every route has a target whose backend answered its last health probe
        (a canary's or shadow's backend being down does not take the gateway out of service)."""
        return self.routes is not None and all(
            any(t.backend.healthy for t in route.targets.values()) for route in self.routes.routes.values())


async def _send(target: Target, payload: bytes, timeout: float, request_id: str, metadata: Metadata) -> bytes:
    """The backend call, through the target's concurrency cap and circuit breaker when the route
    declares them (either refuses with UNAVAILABLE at once: the fallback rules may answer)."""
    cap = target.cap
    if cap is None:
        return await _guarded_call(target, payload, timeout, request_id, metadata)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await cap.acquire(timeout)
    begin = loop.time()
    try:
        return await _guarded_call(target, payload, timeout - (begin - start), request_id, metadata)
    finally:
        cap.release(loop.time() - begin)


async def _guarded_call(target: Target, payload: bytes, timeout: float, request_id: str, metadata: Metadata) -> bytes:
    breaker = target.breaker
    if breaker is None:
        return await target.backend.infer(payload, timeout, request_id, metadata)
    trial = breaker.admit()
    try:
        response = await target.backend.infer(payload, timeout, request_id, metadata)
    except GatewayError as e:
        breaker.record(e, trial)
        raise
    except BaseException:
        breaker.release(trial)
        raise
    breaker.record(None, trial)
    return response


def _timeout(target: Target, client_remaining: float | None) -> float:
    """The backend call's timeout: the target's, or the client's deadline when that is sooner."""
    if client_remaining is None:
        return target.timeout_s
    if client_remaining <= 0:
        raise DeadlineExceeded("Deadline Exceeded")
    return min(client_remaining, target.timeout_s)
