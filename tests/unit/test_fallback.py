"""Fallback rules: conditions, precedence, defaults, batches, and rules the loader rejects."""
from __future__ import annotations

import numpy as np
import pytest

from gateway.config import RoutingConfig
from gateway.errors import InvalidArgument
from gateway.fallback import RuleSet
from gateway.fallback.rules import PARAMETER
from gateway.protocol.wire import pb
from tests.unit.test_config import problems, write

SPEC = {
    "features": {"age": {"input": "features", "index": 0}, "income": {"input": "features", "index": 1}},
    "outputs": {"probabilities": "FP32"},
    "rules": [
        {"name": "senior-low-income", "when": "age >= 65.0 && income < 2000.0", "outputs": {"probabilities": [0.1, 0.1, 0.8]}},
        {"name": "senior", "when": "age >= 65.0", "outputs": {"probabilities": [0.2, 0.3, 0.5]}},
        {"name": "rich", "when": "income > 10000.0 || (age < 25.0 && income > 5000.0)", "outputs": {"probabilities": [0.7, 0.2, 0.1]}},
    ],
    "default": {"name": "default", "outputs": {"probabilities": [0.34, 0.33, 0.33]}},
}


def rules() -> RuleSet:
    config = RoutingConfig.model_validate({"models": {"m": {"target": {"backend": "t", "model": "x"}, "fallback": SPEC}}})
    return RuleSet(config.models["m"].fallback)


def request(rows: list[list[float]]) -> pb.ModelInferRequest:
    data = np.zeros((len(rows), 8), np.float32)
    data[:, :2] = rows
    r = pb.ModelInferRequest(id="r-1")
    r.inputs.add(name="features", datatype="FP32", shape=list(data.shape))
    r.raw_input_contents.append(data.tobytes())
    return r


@pytest.mark.parametrize("age, income, rule", [
    (70, 1000, "senior-low-income"),   # the first matching rule wins over a later, also matching one
    (70, 5000, "senior"),
    (30, 20000, "rich"),
    (20, 6000, "rich"),
    (20, 4000, "default"),
    (40, 10000, "default"),             # boundaries: > is strict
])
def test_conditions_and_precedence(age, income, rule):
    raw, names = rules().answer(request([[age, income]]), "m")
    assert names == rule
    answer = pb.ModelInferResponse.FromString(raw)
    expected = next((r for r in SPEC["rules"] if r["name"] == rule), SPEC["default"])["outputs"]["probabilities"]
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], np.float32), expected)
    assert answer.parameters[PARAMETER].string_param == rule and answer.id == "r-1" and answer.model_name == "m"


def test_each_batch_row_gets_its_own_rule():
    raw, names = rules().answer(request([[70, 1000], [20, 100], [70, 1000]]), "m")
    answer = pb.ModelInferResponse.FromString(raw)
    assert names == "senior-low-income,default" and list(answer.outputs[0].shape) == [3, 3]
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 3)[1].tolist() == pytest.approx([0.34, 0.33, 0.33])


def test_missing_feature_input_is_invalid_argument():
    r = pb.ModelInferRequest()
    r.inputs.add(name="other", datatype="FP32", shape=[1, 2])
    r.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(InvalidArgument, match="fallback feature 'age' needs input 'features'"):
        rules().answer(r, "m")


ROUTE = """\
models:
  m:
    target: {backend: triton, model: x}
    fallback:
      features: {age: {input: features, index: 0}}
      outputs: {p: FP32}
      rules:
        - name: r1
          when: "WHEN"
          outputs: {p: [1.0]}
      default: {name: d, outputs: {p: [0.0]}}
"""


@pytest.mark.parametrize("when, line, reason", [
    ("age >", 9, "does not compile"),
    ("salary > 3.0", 5, "uses unknown features: salary"),
])
def test_rules_that_do_not_compile_or_name_unknown_features_reject_the_config(tmp_path, when, line, reason):
    found = problems(write(tmp_path, routing=ROUTE.replace("WHEN", when)))
    assert any(f"routing.yaml:{line}:" in p and reason in p for p in found), found


def test_rule_outputs_must_match_the_declared_outputs(tmp_path):
    found = problems(write(tmp_path, routing=ROUTE.replace("WHEN", "age > 1.0").replace("{p: [1.0]}", "{q: [1.0]}")))
    assert any("must give exactly the outputs p" in p for p in found), found
