"""The admin listener: Prometheus metrics, liveness and readiness (open, for scrapers and
probes), and the routing admin API (only for callers an access rule grants `admin`).

Routing changes made here are runtime overrides, not edits of routing.yaml: they are kept in
the route state store — the state file (`state_file`, by default `<routing file>.state.json`),
or Redis shared by every replica (`route_state.store: redis`) — so every worker and replica
applies them, shown as overrides by `GET /admin/routes` and `infergate routes`, and dropped for a
route when its entry in the routing file changes. A store that cannot be written answers 503.
"""
from __future__ import annotations

from typing import Any, Callable

import orjson
from aiohttp import web

from gateway.backends.triton import registry_manifest
from gateway.frontends.http import errors, json_response, principal
from gateway.observability.metrics import exposition
from gateway.routing.live import LiveRouting
from gateway.routing.state import RolloutStatus, RouteState
from gateway.routing.table import Route
from gateway.security.identity import Authenticator
from gateway.security.principal import Principal

Authorize = Callable[[Principal | None, str, str], None]


def describe(route: Route, state: RouteState | None) -> dict[str, Any]:
    """One route as the admin API and `infergate routes` show it."""
    spec = route.spec
    file_weights = {name: t.weight for name, t in spec.named_targets().items()}
    doc: dict[str, Any] = {
        "model": route.public,
        "targets": [{"name": t.name, "backend": t.backend.name, "model": t.model, "version": t.version,
                     "weight": t.weight, "file_weight": file_weights[t.name],
                     "serving": route.serving(t), "breaker": t.breaker.state if t.breaker else None}
                    for t in route.targets.values()],
        "active": route.active.name if route.active else None,
        "sticky": spec.sticky.model_dump(exclude_none=True) if spec.sticky else None,
        "pins": [p.model_dump() for p in spec.match],
        "shadows": [{"target": s.target.name, "rate": s.rate} for s in route.shadows],
        "overrides": {k: v for k, v in (("weights", state.weights_override), ("active", state.active),
                                        ("versions", state.versions)) if v} if state else {},
        "rollout": None,
    }
    if spec.rollout is not None:
        status = (state.rollout if state else None) or RolloutStatus()
        doc["rollout"] = {"target": spec.rollout.target, "steps": spec.rollout.steps, "step": status.step,
                          "percent": route.targets[spec.rollout.target].weight, "phase": status.phase,
                          "reason": status.reason, "since": status.since}
    return doc


class _BadRequest(Exception):
    pass


def app(is_ready: Callable[[], bool], live: LiveRouting, authenticator: Authenticator, authorize: Authorize) -> web.Application:
    """`authorize(principal, model, "admin")` raises when the access rules refuse the caller."""
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def alive(request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def ready(request: web.Request) -> web.Response:
        ok = is_ready()
        return web.Response(text="ready\n" if ok else "not ready\n", status=200 if ok else 503)

    async def routes(request: web.Request) -> web.Response:
        """The routes the caller may administer."""
        caller, table = principal(request, authenticator), live.table
        shown = [r for r in table.routes.values() if table.access.rule_for(caller, r.public, "admin") is not None]
        if not shown:
            authorize(caller, "", "admin")  # refused for every model: say so (401 / 403) rather than list nothing
        return json_response([describe(r, live.states.get(r.public)) for r in shown])

    async def change(request: web.Request) -> web.Response:
        """POST /admin/routes/{model}/{weights|active|promote|rollback|propose|reset}."""
        model, action = request.match_info["model"], request.match_info["action"]
        authorize(principal(request, authenticator), model, "admin")
        route = live.table.routes.get(model)
        if route is None:
            return json_response({"error": f"unknown model {model!r}"}, 404)
        try:
            body = orjson.loads(await request.read() or b"{}")
            if not isinstance(body, dict):
                raise _BadRequest("body must be a JSON object")
            await live.update(model, lambda state: _apply(route, state, action, body))
        except (orjson.JSONDecodeError, _BadRequest) as e:
            return json_response({"error": str(e)}, 400)
        return json_response(describe(live.table.routes[model], live.states.get(model)))

    async def manifests(request: web.Request) -> web.Response:
        """GET /admin/routes/{model}/manifests: each target's version and the registry manifest
        (lineage, trained_at) registry-sync put in Triton's model config for it."""
        model = request.match_info["model"]
        authorize(principal(request, authenticator), model, "admin")
        route = live.table.routes.get(model)
        if route is None:
            return json_response({"error": f"unknown model {model!r}"}, 404)
        found = []
        for target in route.targets.values():
            config = (await target.backend.cached("ModelConfig", target.model, target.version)).config
            found.append({"target": target.name, "model": target.model, "version": target.version,
                          "manifest": registry_manifest(config, target.version)})
        return json_response(found)

    application = web.Application(middlewares=[errors])
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/live", alive)
    application.router.add_get("/ready", ready)
    application.router.add_get("/admin/routes", routes)
    application.router.add_post("/admin/routes/{model}/{action}", change)
    application.router.add_get("/admin/routes/{model}/manifests", manifests)
    return application


def _apply(route: Route, state: RouteState, action: str, body: dict[str, Any]) -> RouteState:
    """The state after one admin action; raises _BadRequest with the reason when it cannot apply."""
    names = list(route.targets)
    rollout = route.spec.rollout
    if action == "weights":
        weights = body.get("weights")
        if not isinstance(weights, dict) or set(weights) - set(names) or \
                not all(isinstance(w, int) and 0 <= w <= 100 for w in weights.values()) or sum(weights.values()) != 100:
            raise _BadRequest(f"'weights' must map targets ({', '.join(names)}) to integers summing to 100")
        state.weights_override, state.active = dict(weights), None
    elif action == "active":
        target = body.get("target")
        if target not in names:
            raise _BadRequest(f"'target' must be one of {', '.join(names)}")
        state.active = target
    elif action == "promote":
        target = body.get("target") or (rollout.target if rollout else None)
        if target not in names:
            raise _BadRequest(f"'target' must be one of {', '.join(names)}")
        if rollout is not None and target == rollout.target:
            state.rollout = RolloutStatus(len(rollout.steps) - 1, phase="promoted", reason="promoted through the admin API")
            state.weights_override, state.active = None, None
        else:
            state.weights_override, state.active = {target: 100}, None
    elif action == "rollback":
        if rollout is not None:
            state.rollout = RolloutStatus(phase="rolled_back", reason="rolled back through the admin API")
            state.weights_override, state.active = None, None
        else:
            state = RouteState()
    elif action == "propose":
        target, version = body.get("target") or (rollout.target if rollout else None), body.get("version")
        if target not in names:
            raise _BadRequest(f"'target' must be one of {', '.join(names)}")
        if not isinstance(version, str) or not version.isdigit():
            raise _BadRequest("'version' must be a Triton version number, as a string")
        taken = {(t.backend.name, t.model, t.version) for n, t in route.targets.items() if n != target}
        if (route.targets[target].backend.name, route.targets[target].model, version) in taken:
            raise _BadRequest(f"another target of {route.public!r} already serves version {version}")
        state.versions = {**(state.versions or {}), target: version}
        if rollout is not None and target == rollout.target:  # the rollout starts over with the new version
            state.rollout, state.weights_override, state.active = RolloutStatus(), None, None
    elif action == "reset":
        state = RouteState()
    else:
        raise _BadRequest(f"unknown action {action!r}: weights, active, promote, rollback, propose or reset")
    return state
