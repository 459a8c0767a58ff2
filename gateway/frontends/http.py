"""The v2 REST protocol over aiohttp: health, metadata, config, statistics, index and infer
(JSON tensors and Triton's binary tensor extension). Errors answer {"error": message} with the
HTTP status the gRPC code maps to in gateway.errors."""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import grpc
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import __version__
from gateway.dataplane import Call, DataPlane
from gateway.errors import GatewayError, InvalidArgument
from gateway.frontends.grpc import EXTENSIONS, FALLBACK_HEADER, TARGET_HEADER
from gateway.observability.trace import TRACEPARENT, Trace
from gateway.outcomes import feedback as outcome_feedback
from gateway.protocol import http_codec
from gateway.protocol.messages import to_json
from gateway.protocol.wire import pb
from gateway.security.identity import Authenticator
from gateway.security.principal import Principal

log = logging.getLogger(__name__)


class _QuietBadRequests(logging.Filter):
    """aiohttp logs each malformed request line or header at ERROR with a traceback after it has
    answered 400: a hostile client must not be able to flood the log with them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


logging.getLogger("aiohttp.server").addFilter(_QuietBadRequests())

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json", headers=headers)


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    """{"error": message} with the error's HTTP status and headers (and any given)."""
    return json_response({"error": error.message}, error.http_status, error.headers() | (headers or {}))


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return json_response({"error": e.text or e.reason}, e.status, allow)  # 404, 405, 413 as JSON too
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return json_response({"error": "internal gateway error"}, 500)


def principal(request: web.Request, authenticator: Authenticator) -> Principal | None:
    """The caller: a bearer token in Authorization, else the client certificate TLS verified."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    cert = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return authenticator.identify(cert, request.headers.get("Authorization"))


class HttpFrontend:
    """Route handlers over the shared dataplane."""

    def __init__(self, dataplane: DataPlane, is_ready: Callable[[], bool], authenticator: Authenticator) -> None:
        self.dataplane = dataplane
        self.is_ready = is_ready
        self.authenticator = authenticator

    def app(self, max_message_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_message_bytes, middlewares=[errors])
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/models/stats", self.statistics)
        app.router.add_post("/v2/repository/index", self.repository_index)
        for prefix in (model, versioned):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_get(prefix + "/config", self.model_config)
            app.router.add_get(prefix + "/stats", self.statistics)
            app.router.add_post(prefix + "/infer", self.infer)
        app.router.add_post(model + "/feedback", self.feedback)
        return app

    async def infer(self, request: web.Request) -> web.Response:
        """One request; the response headers name the target that served it and the gateway's
        span (traceparent), on errors too. A body that cannot be read, or credentials that do not
        verify, are audited as refused."""
        model, version = request.match_info["model"], request.match_info.get("version", "")
        trace = Trace.from_headers(request.headers)
        span = {TRACEPARENT: trace.traceparent()}
        call = None
        try:
            caller = principal(request, self.authenticator)
            body = await request.read()
            infer_request, plan = http_codec.decode_request(
                body, request.headers.get(http_codec.HEADER_LENGTH), model, version)
            call = Call(model, version, infer_request.id, infer_request.SerializeToString(), "http", request.remote or "",
                        request.headers, infer_request, trace, principal=caller)
            answer = await self.dataplane.infer(call)
        except GatewayError as e:
            if call is None:
                self.dataplane.refused(trace, model, "http", request.remote or "", e, request.headers)
            return error_response(e, span)
        except web.HTTPRequestEntityTooLarge as e:  # over max_message_bytes: gRPC's RESOURCE_EXHAUSTED
            self.dataplane.refused(trace, model, "http", request.remote or "",
                                   GatewayError(e.text or e.reason, grpc.StatusCode.RESOURCE_EXHAUSTED), request.headers)
            return json_response({"error": e.text or e.reason}, e.status, span)
        out, header_length = http_codec.encode_response(pb.ModelInferResponse.FromString(answer.raw), plan)
        headers = {TARGET_HEADER: answer.target, **span}
        if answer.fallback:
            headers[FALLBACK_HEADER] = answer.fallback
        if header_length is None:
            response = web.Response(body=out, content_type="application/json", headers=headers)
        else:
            headers[http_codec.HEADER_LENGTH] = str(header_length)
            response = web.Response(body=out, content_type="application/octet-stream", headers=headers)
        if request.headers.get("Accept-Encoding"):
            response.enable_compression()
        return response

    async def feedback(self, request: web.Request) -> web.Response:
        """Outcomes for earlier requests of one model (issue #10's feedback API): each item's fate in order."""
        caller = principal(request, self.authenticator)
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            raise InvalidArgument(f"the body is not JSON: {e}") from None
        items = outcome_feedback.from_json(request.match_info["model"], doc)
        return json_response(outcome_feedback.to_json(await self.dataplane.feedback(request.match_info["model"], items, caller)))

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.is_ready() else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({"name": "infergate", "version": __version__, "extensions": list(EXTENSIONS)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        m, caller = request.match_info, principal(request, self.authenticator)
        return json_response(to_json(await self.dataplane.model_metadata(m["model"], m.get("version", ""), caller)))

    async def model_ready(self, request: web.Request) -> web.Response:
        m, caller = request.match_info, principal(request, self.authenticator)
        return web.Response(status=200 if await self.dataplane.model_ready(m["model"], m.get("version", ""), caller) else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        m, caller = request.match_info, principal(request, self.authenticator)
        return json_response(to_json((await self.dataplane.model_config(m["model"], m.get("version", ""), caller)).config))

    async def statistics(self, request: web.Request) -> web.Response:
        m, caller = request.match_info, principal(request, self.authenticator)
        return json_response(to_json(await self.dataplane.model_statistics(m.get("model", ""), m.get("version", ""), caller)))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            ready_only = bool(orjson.loads(body).get("ready", False)) if body else False
        except (orjson.JSONDecodeError, AttributeError):
            return json_response({"error": "failed to parse the request JSON buffer"}, 400)
        caller = principal(request, self.authenticator)
        return json_response(to_json(await self.dataplane.repository_index(ready_only, caller))["models"])
