"""The compiled route table and its decisions, the split, rollout weights and controller steps,
admin actions and shadow comparison: pure logic, no network."""
from __future__ import annotations

import asyncio
import random
from collections import Counter

import numpy as np
import pytest

from gateway.config import Backend, Compare, RoutingConfig
from gateway.errors import NotFound
from gateway.frontends.admin import _apply, _BadRequest
from gateway.outcomes.sequential import Arm
from gateway.protocol.wire import pb
from gateway.routing.rollout import RolloutController
from gateway.routing.shadow import compare
from gateway.routing.split import Split
from gateway.routing.state import RolloutStatus, RouteState, rollout_weights
from gateway.routing.table import compile_routes


class FakeBackend:
    """Only what compile_routes reads; no network here."""

    name = "t"
    config = Backend(url="127.0.0.1:1", request_timeout_s=7)


def table(models: dict, states: dict | None = None, stats: dict | None = None):
    return compile_routes(RoutingConfig.model_validate({"models": models}), {"t": FakeBackend()},
                          states or {}, {} if stats is None else stats)


SPLIT = {"scorer": {"targets": {"a": {"backend": "t", "model": "classifier", "version": 1, "weight": 90},
                                "b": {"backend": "t", "model": "classifier", "version": 2, "weight": 10}},
                    "match": [{"header": "X-Canary", "value": "yes", "target": "b"}],
                    "sticky": {"header": "x-user"}, "timeout_s": 0.5}}


def test_unknown_model_is_not_found_with_tritons_message():
    with pytest.raises(NotFound, match="Request for unknown model: 'nope' is not found"):
        table(SPLIT).resolve("nope")


def test_single_target_same_name_needs_no_rewrite():
    route = table({"double": {"target": {"backend": "t", "model": "double"}}}).resolve("double")
    decision = route.decide("", {}, None)
    assert decision.suffix == b"" and decision.target.response_suffix == b"" and decision.target.timeout_s == 7
    assert route.decide("3", {}, None).target.name == "primary"  # unpinned: the client's version passes


def test_renamed_route_rewrites_request_and_response():
    route = table(SPLIT).resolve("scorer")
    request = pb.ModelInferRequest(model_name="scorer").SerializeToString()
    decision = route.decide("", {"x-canary": "yes"}, None)
    sent = pb.ModelInferRequest.FromString(request + decision.suffix)
    assert (sent.model_name, sent.model_version, decision.reason) == ("classifier", "2", "pin")
    answer = pb.ModelInferResponse(model_name="classifier").SerializeToString() + decision.target.response_suffix
    assert pb.ModelInferResponse.FromString(answer).model_name == "scorer"


def test_explicit_version_picks_its_target_or_is_not_found():
    route = table(SPLIT).resolve("scorer")
    assert route.decide("1", {"x-canary": "yes"}, None).target.name == "a"
    with pytest.raises(NotFound, match="'scorer' version 3 is not found"):
        route.decide("3", {}, None)


def test_weights_split_traffic_within_three_sigma():
    random.seed(7)
    route = table({"scorer": {**SPLIT["scorer"], "sticky": None}}).resolve("scorer")
    n = 20000
    hits = Counter(route.decide("", {}, None).target.name for _ in range(n))
    sigma = (n * 0.1 * 0.9) ** 0.5
    assert abs(hits["b"] - n * 0.1) < 3 * sigma


def test_sticky_keys_stay_put_and_move_minimally():
    before = table(SPLIT).resolve("scorer")
    keys = [f"user-{i}" for i in range(3000)]
    first = {k: before.decide("", {"x-user": k}, None).target.name for k in keys}
    assert all(before.decide("", {"x-user": k}, None).target.name == first[k] for k in keys)
    assert 0.07 < sum(v == "b" for v in first.values()) / len(keys) < 0.13
    after = table(SPLIT, {"scorer": RouteState(weights_override={"a": 75, "b": 25})}).resolve("scorer")
    second = {k: after.decide("", {"x-user": k}, None).target.name for k in keys}
    moved = [k for k in keys if first[k] != second[k]]
    assert all(first[k] == "a" and second[k] == "b" for k in moved)  # only a -> b, never back
    assert 0.10 < len(moved) / len(keys) < 0.20                       # about the 15% the weights moved


def test_sticky_parameter_and_blue_green_switch():
    spec = {"m": {"targets": {"blue": {"backend": "t", "model": "x", "version": 1, "weight": 50},
                              "green": {"backend": "t", "model": "x", "version": 2, "weight": 50}},
                  "sticky": {"parameter": "user_id"}, "active": "blue"}}
    request = pb.ModelInferRequest()
    request.parameters["user_id"].int64_param = 42
    assert table(spec).resolve("m").decide("", {}, request).reason == "active"
    flipped = table(spec, {"m": RouteState(active="green")}).resolve("m")
    assert {flipped.decide("", {}, request).target.name for _ in range(50)} == {"green"}
    spec["m"]["active"] = None
    route = table(spec).resolve("m")
    assert len({route.decide("", {}, request).target.name for _ in range(50)}) == 1


def test_split_pick_is_proportional():
    split = Split([("a", "a", 30), ("b", "b", 0), ("c", "c", 70)])
    assert split.items == ["a", "c"] and split.pick(0.29) == "a" and split.pick(0.31) == "c"


def test_rollout_weights_share_the_rest_by_file_weight():
    assert rollout_weights({"a": 100, "b": 0}, "b", 5) == {"a": 95, "b": 5}
    assert rollout_weights({"a": 60, "b": 30, "c": 10}, "c", 50) == {"a": 34, "b": 16, "c": 50}
    assert sum(rollout_weights({"a": 33, "b": 33, "c": 34}, "c", 25).values()) == 100


ROLLOUT = {"m": {"targets": {"stable": {"backend": "t", "model": "x", "version": 1, "weight": 100},
                             "canary": {"backend": "t", "model": "x", "version": 2, "weight": 0}},
                 "rollout": {"target": "canary", "steps": [10, 50, 100], "dwell_s": 5, "min_requests": 20,
                             "max_error_rate_increase": 0.05, "max_p99_ratio": 2.0}}}


class Harness:
    """A controller over an in-memory table whose commits rebuild the table."""

    def __init__(self, spec: dict = ROLLOUT, **controller: object) -> None:
        self.spec = spec
        self.stats: dict = {}
        self.states: dict = {}
        self.table = table(spec, self.states, self.stats)
        self.controller = RolloutController(lambda: self.table, lambda: self.states, self.update, **controller)

    async def update(self, model: str, change) -> None:
        self.states = {**self.states, model: change(self.states.get(model) or RouteState())}
        self.table = table(self.spec, self.states, self.stats)

    def tick(self) -> None:
        asyncio.run(self.controller.tick())

    def feed(self, target: str, n: int, ok: bool = True, seconds: float = 0.01) -> None:
        for _ in range(n):
            self.stats[("m", target)].record(ok, seconds)

    def age_step(self, seconds: float) -> None:
        self.states["m"].rollout.since -= seconds


def test_rollout_advances_while_gates_hold_then_promotes():
    h = Harness()
    h.tick()
    assert h.table.resolve("m").targets["canary"].weight == 10
    h.feed("stable", 200)
    h.feed("canary", 30)
    h.tick()
    assert h.states["m"].rollout.step == 0, "dwell not over yet"
    h.age_step(10)
    h.tick()
    assert h.table.resolve("m").targets["canary"].weight == 50
    for _ in range(2):
        h.feed("stable", 100)
        h.feed("canary", 30)
        h.age_step(10)
        h.tick()
    assert h.states["m"].rollout.phase == "promoted" and h.table.resolve("m").targets["canary"].weight == 100


@pytest.mark.parametrize("ok, seconds, reason", [(False, 0.01, "error rate"), (True, 0.5, "p99 latency")])
def test_rollout_rolls_back_on_errors_or_latency(ok, seconds, reason):
    h = Harness()
    h.tick()
    h.feed("stable", 200)
    h.feed("canary", 25, ok=ok, seconds=seconds)
    h.tick()
    status = h.states["m"].rollout
    assert status.phase == "rolled_back" and reason in status.reason
    assert h.table.resolve("m").targets["canary"].weight == 0


AB = {"m": {**ROLLOUT["m"], "outcomes": {"task": "none", "business": {"converted": "rate"},
                                          "test": {"outcome": "converted", "margin": 0.02, "min_samples": 50}}}}


def ab_harness(canary_rate: float, n: int) -> tuple[Harness, list]:
    """A rollout with an A/B test on `converted`: the canary converts at canary_rate, the stable
    target at 0.30, n outcomes each since the step began (expected values, no noise)."""
    looks: list = []

    def arms(route, canary, primary, since):
        assert (route.public, canary, primary) == ("m", "canary", "stable") and since == h.states["m"].rollout.since
        return Arm(n, canary_rate * n, canary_rate * n), Arm(n, 0.30 * n, 0.30 * n)

    events: list = []
    h = Harness(AB, outcomes=arms, on_test=lambda *look: looks.append(look),
                on_event=lambda model, target, event: events.append(event))
    h.events = events
    return h, looks


def walk(h: Harness, ticks: int) -> None:
    """Ticks with enough traffic on both targets and the dwell over each time."""
    h.tick()
    for _ in range(ticks):
        h.feed("stable", 200)
        h.feed("canary", 30)
        h.age_step(10)
        h.tick()


def test_the_ab_gate_rolls_back_a_candidate_shown_worse():
    h, looks = ab_harness(0.20, 2000)
    h.tick()
    h.feed("stable", 200)
    h.feed("canary", 30)
    h.tick()
    status = h.states["m"].rollout
    assert status.phase == "rolled_back" and "converted" in status.reason
    assert looks and looks[-1][:3] == ("m", "canary", "converted") and looks[-1][3].verdict == "worse"


def test_an_unreadable_outcome_store_leaves_the_other_gates_deciding():
    def down(route, canary, primary, since):
        raise OSError("the join store is down")

    h = Harness(AB, outcomes=down)
    h.tick()
    h.feed("stable", 200)
    h.feed("canary", 25, ok=False)
    h.tick()
    status = h.states["m"].rollout
    assert status.phase == "rolled_back" and "error rate" in status.reason


def test_the_ab_gate_promotes_a_candidate_shown_not_worse():
    h, looks = ab_harness(0.31, 20000)
    walk(h, 3)                           # 10% -> 50% -> (the test passes) 100% -> promoted
    assert h.states["m"].rollout.phase == "promoted" and looks[-1][3].verdict == "not_worse"


def test_the_ab_gate_holds_an_undecided_candidate_at_the_last_shared_step():
    h, looks = ab_harness(0.30, 60)      # too few outcomes to tell 0.30 from 0.28
    walk(h, 6)                           # 10% -> 50%, held there: 100% would leave no primary to compare with
    status = h.states["m"].rollout
    assert status.phase == "progressing" and status.step == 1 and "converted: not yet shown" in status.reason
    assert h.table.resolve("m").targets["canary"].weight == 50 and looks[-1][3].verdict == "undecided"
    assert h.events == ["started", "advanced", "held"], "a hold is written once, not at every look"


def test_admin_weights_override_the_files_blue_green_and_unknown_names_are_ignored():
    spec = {"m": {"targets": {"blue": {"backend": "t", "model": "x", "version": 1, "weight": 50},
                              "green": {"backend": "t", "model": "x", "version": 2, "weight": 50}}, "active": "blue"}}
    route = table(spec, {"m": RouteState(weights_override={"blue": 0, "green": 100})}).resolve("m")
    assert route.active is None and {route.decide("", {}, None).target.name for _ in range(20)} == {"green"}
    stale = table(spec, {"m": RouteState(weights_override={"gone": 100}, active="gone")}).resolve("m")
    assert stale.active.name == "blue" and stale.targets["green"].weight == 50


def test_admin_actions():
    route = table(ROLLOUT).resolve("m")
    assert _apply(route, RouteState(), "weights", {"weights": {"stable": 70, "canary": 30}}).weights_override == {"stable": 70, "canary": 30}
    with pytest.raises(_BadRequest, match="summing to 100"):
        _apply(route, RouteState(), "weights", {"weights": {"stable": 70}})
    assert _apply(route, RouteState(), "promote", {}).rollout.phase == "promoted"
    assert _apply(route, RouteState(), "rollback", {}).rollout.phase == "rolled_back"
    assert _apply(route, RouteState(), "active", {"target": "canary"}).active == "canary"
    with pytest.raises(_BadRequest, match="one of stable, canary"):
        _apply(route, RouteState(), "active", {"target": "nope"})
    assert _apply(route, RouteState(active="canary"), "reset", {}).is_empty()


def test_a_proposed_version_restarts_the_rollout_on_it():
    """registry-sync proposes a newly installed Triton version for the canary target."""
    route = table(ROLLOUT).resolve("m")
    done = RouteState(rollout=RolloutStatus(step=2, phase="rolled_back"), weights_override={"stable": 100})
    state = _apply(route, done, "propose", {"target": "canary", "version": "7"})
    assert state.versions == {"canary": "7"} and state.rollout.phase == "progressing" and state.rollout.step == 0
    assert state.weights_override is None
    proposed = table(ROLLOUT, {"m": state}).resolve("m")
    assert proposed.targets["canary"].version == "7" and proposed.by_version["7"] is proposed.targets["canary"]
    assert proposed.targets["canary"].weight == ROLLOUT["m"]["rollout"]["steps"][0]
    with pytest.raises(_BadRequest, match="Triton version number"):
        _apply(route, RouteState(), "propose", {"target": "canary", "version": "latest"})
    stable_version = str(route.targets["stable"].version)
    with pytest.raises(_BadRequest, match="already serves version"):
        _apply(route, RouteState(), "propose", {"target": "canary", "version": stable_version})


def _answer(values: list[list[float]]) -> pb.ModelInferResponse:
    array = np.asarray(values, np.float32)
    answer = pb.ModelInferResponse()
    answer.outputs.add(name="p", datatype="FP32", shape=list(array.shape))
    answer.raw_output_contents.append(array.tobytes())
    return answer


def test_shadow_compare_tolerance_and_argmax():
    a = _answer([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    close = _answer([[0.70001, 0.2, 0.1], [0.1, 0.8, 0.1]])
    flipped = _answer([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    assert compare(a, close, Compare(atol=1e-3)).agree
    assert not compare(a, close, Compare(atol=1e-6)).agree
    by_argmax = compare(a, flipped, Compare(atol=None, argmax=True))
    assert not by_argmax.agree and by_argmax.argmax_agree is False and by_argmax.max_abs_diff == pytest.approx(0.5)
    assert compare(a, close, Compare(atol=None, argmax=True)).agree
    assert not compare(a, _answer([[0.7, 0.2, 0.1]]), Compare()).agree  # shapes differ


def test_shadow_nan_disagrees_unless_both_are_nan():
    a = _answer([[0.5, np.nan, 0.1]])
    assert compare(a, _answer([[0.5, np.nan, 0.1]]), Compare(atol=1e-6)).agree
    assert not compare(_answer([[0.5, 0.4, 0.1]]), a, Compare(atol=1e-6)).agree
