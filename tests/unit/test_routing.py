"""The compiled route table: lookups, version pins and the precomputed byte rewrites."""
from __future__ import annotations

import pytest

from gateway.config import Backend, RoutingConfig
from gateway.errors import NotFound
from gateway.protocol.wire import pb
from gateway.routing import compile_routes


class FakeBackend:
    """Only what compile_routes reads; no network here."""

    config = Backend(url="127.0.0.1:1", request_timeout_s=7)


def table():
    config = RoutingConfig.model_validate({"models": {
        "double": {"target": {"backend": "t", "model": "double"}},
        "scorer": {"target": {"backend": "t", "model": "classifier", "version": 2}, "timeout_s": 0.5}}})
    return compile_routes(config, {"t": FakeBackend()})


def test_unknown_model_is_not_found_with_tritons_message():
    with pytest.raises(NotFound, match="Request for unknown model: 'nope' is not found"):
        table().resolve("nope")


def test_same_name_needs_no_rewrite_and_uses_backend_timeout():
    route = table().resolve("double")
    assert route.request_suffix("") == b"" and route.response_suffix == b"" and route.timeout_s == 7


def test_renamed_and_pinned_route_rewrites_request_and_response():
    route = table().resolve("scorer")
    request = pb.ModelInferRequest(model_name="scorer").SerializeToString()
    sent = pb.ModelInferRequest.FromString(request + route.request_suffix(""))
    assert (sent.model_name, sent.model_version) == ("classifier", "2")
    assert pb.ModelInferRequest.FromString(request + route.request_suffix("2")).model_name == "classifier"
    answer = pb.ModelInferResponse(model_name="classifier").SerializeToString() + route.response_suffix
    assert pb.ModelInferResponse.FromString(answer).model_name == "scorer"
    assert route.timeout_s == 0.5


def test_pinned_route_refuses_other_versions():
    with pytest.raises(NotFound, match="'scorer' version 1 is not found"):
        table().resolve("scorer").request_suffix("1")
