"""Fallback rules: CEL (the expression language of Kubernetes and Envoy, evaluated by the
`common-expression-language` package: no eval, no side effects) over named features taken
from the request's input tensors, one evaluation per batch row. Compiled at config load."""
from __future__ import annotations

from typing import Any

import cel
import numpy as np

from gateway.config import Fallback
from gateway.errors import InvalidArgument
from gateway.protocol.tensors import DTYPES
from gateway.protocol.wire import pb

PARAMETER = "infergate_fallback"   # response parameter naming the rule(s) that answered


def compile_condition(source: str) -> Any:
    """A compiled CEL program; ValueError with the parser's message when it does not compile."""
    try:
        return cel.compile(source)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"condition {source!r} does not compile: {e}") from None


class RuleSet:
    """One route's compiled rules; `answer` builds a serialized ModelInferResponse."""

    def __init__(self, spec: Fallback) -> None:
        self.features = {name: (f.input, f.index) for name, f in spec.features.items()}
        self.outputs = dict(spec.outputs)
        self.rules = [(r.name, compile_condition(r.when), _rows(r.outputs, self.outputs)) for r in spec.rules]
        self.default = (spec.default.name, None, _rows(spec.default.outputs, self.outputs))

    def answer(self, request: pb.ModelInferRequest, model: str) -> tuple[bytes, str]:
        """(serialized ModelInferResponse, the rule names that answered, comma-separated)."""
        rows = self._feature_rows(request)
        chosen = [self._choose(row) for row in rows]
        response = pb.ModelInferResponse(model_name=model, id=request.id)
        for name, datatype in self.outputs.items():
            values = np.stack([rule[2][name] for rule in chosen])
            response.outputs.add(name=name, datatype=datatype, shape=list(values.shape))
            response.raw_output_contents.append(values.tobytes())
        names = ",".join(dict.fromkeys(rule[0] for rule in chosen))
        response.parameters[PARAMETER].string_param = names
        return response.SerializeToString(), names

    def _choose(self, row: dict[str, float]) -> tuple[str, Any, dict[str, np.ndarray]]:
        for rule in self.rules:
            try:
                if rule[1].execute(row) is True:
                    return rule
            except (ValueError, RuntimeError, TypeError):
                continue  # a condition that cannot be evaluated on this row does not match
        return self.default

    def _feature_rows(self, request: pb.ModelInferRequest) -> list[dict[str, float]]:
        """Per batch row, each feature's value (the first dimension is the batch)."""
        columns: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            dtype = DTYPES.get(tensor.datatype)
            if dtype is None or i >= len(request.raw_input_contents):
                continue
            array = np.frombuffer(request.raw_input_contents[i], dtype)
            batch = tensor.shape[0] if len(tensor.shape) > 1 else 1
            if array.size and array.size % max(batch, 1) == 0:
                columns[tensor.name] = array.reshape(batch, -1)
        batch = max((c.shape[0] for c in columns.values()), default=1)
        rows: list[dict[str, float]] = [{} for _ in range(batch)]
        for feature, (source, index) in self.features.items():
            column = columns.get(source)
            if column is None or index >= column.shape[1]:
                raise InvalidArgument(f"fallback feature '{feature}' needs input '{source}' with an element {index}")
            for r in range(batch):
                rows[r][feature] = column[min(r, column.shape[0] - 1), index].item()
        return rows


def _rows(values: dict[str, list[Any]], datatypes: dict[str, str]) -> dict[str, np.ndarray]:
    return {name: np.asarray(values[name], dtype=DTYPES[datatype]) for name, datatype in datatypes.items()}
