"""The v2 REST infer body, JSON or with Triton's binary tensor extension, to and from protobuf.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes followed
by the tensors' raw bytes, in the order of the inputs (or outputs) that carry a
`binary_data_size` parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidArgument
from gateway.protocol.tensors import brief, check_tensor, json_to_raw, raw_to_json, refuse_shared_memory
from gateway.protocol.wire import pb

HEADER_LENGTH = "Inference-Header-Content-Length"
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """Which outputs the caller wants as binary blobs instead of JSON data."""

    binary_all: bool
    binary: frozenset[str]

    def is_binary(self, name: str) -> bool:
        return self.binary_all or name in self.binary


def decode_request(body: bytes, header_length: str | None, model: str, version: str) -> tuple[pb.ModelInferRequest, OutputPlan]:
    """Parse an HTTP infer body into a ModelInferRequest plus how outputs are to be encoded. Any
    body is answered: a request whose tensors agree with their shapes, or InvalidArgument; sizes
    the body states are checked against the body before anything is built from them."""
    header, blobs = _split(body, header_length)
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise InvalidArgument(f"failed to parse the request JSON buffer: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("failed to parse the request JSON buffer: expected a JSON object")

    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        if not isinstance(doc["id"], str):
            raise InvalidArgument(f"'id' must be a string, not {brief(doc['id'])}")
        request.id = doc["id"]
    params = _object(doc.get("parameters", {}), "parameters")
    binary_all = _flag(params.pop("binary_data_output", False), "binary_data_output")
    _set_params(request.parameters, params)

    offset = 0
    for item in _list(doc.get("inputs"), "inputs", required=True):
        item = _object(item, "inputs[]")
        name = _text(item, "name", "input")
        datatype = _text(item, "datatype", f"input '{name}'")
        shape = _shape(item.get("shape"), name)
        item_params = _object(item.get("parameters", {}), f"parameters of input '{name}'")
        refuse_shared_memory(item_params, name)
        size = item_params.pop("binary_data_size", None)
        if size is not None:
            if "data" in item:
                raise InvalidArgument(f"input '{name}' has both 'data' and 'binary_data_size'")
            if not _is_int(size) or not 0 <= size <= len(blobs) - offset:
                raise InvalidArgument(f"binary_data_size of input '{name}' is {brief(size)} but only "
                                      f"{len(blobs) - offset} bytes of binary data remain")
            check_tensor(name, datatype, shape, blobs[offset:offset + size])
            raw = bytes(blobs[offset:offset + size])
            offset += size
        elif "data" in item:
            raw = json_to_raw(datatype, item["data"], name, check_tensor(name, datatype, shape, None))
        else:
            raise InvalidArgument(f"input '{name}' has neither 'data' nor 'binary_data_size'")
        _set_params(request.inputs.add(name=name, datatype=datatype, shape=shape).parameters, item_params)
        request.raw_input_contents.append(raw)
    if offset != len(blobs):
        raise InvalidArgument(f"{len(blobs) - offset} bytes of binary data follow the inputs unclaimed")

    binary: set[str] = set()
    for item in _list(doc.get("outputs", []), "outputs"):
        item = _object(item, "outputs[]")
        name = _text(item, "name", "output")
        out_params = _object(item.get("parameters", {}), f"parameters of output '{name}'")
        if _flag(out_params.pop("binary_data", binary_all), f"binary_data of output '{name}'"):
            binary.add(name)
        _set_params(request.outputs.add(name=name).parameters, out_params)
    return request, OutputPlan(binary_all and not doc.get("outputs"), frozenset(binary))


def encode_response(response: pb.ModelInferResponse, plan: OutputPlan) -> tuple[bytes, int | None]:
    """The HTTP body for a ModelInferResponse, and the JSON header's length if blobs follow."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = {k: _param_value(v) for k, v in response.parameters.items()}
    outputs, blobs = [], []
    for i, tensor in enumerate(response.outputs):
        raw = response.raw_output_contents[i] if i < len(response.raw_output_contents) else b""
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = {k: _param_value(v) for k, v in tensor.parameters.items()}
        if plan.is_binary(tensor.name):
            params["binary_data_size"] = len(raw)
            blobs.append(raw)
        else:
            out["data"] = raw_to_json(tensor.datatype, raw)
        if params:
            out["parameters"] = params
        outputs.append(out)
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=_JSON_OPTS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    digits = header_length.isascii() and header_length.isdigit() and len(header_length) <= 20
    n = int(header_length) if digits else -1
    if not 0 <= n <= len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} is {brief(header_length)}, body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _set_params(target: Any, params: dict[str, Any]) -> None:
    for key, value in params.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if value < 2**63:
                p.int64_param = value
            else:  # orjson reads larger integers than uint64 as floats
                p.uint64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise InvalidArgument(f"parameter {brief(key)} must be a bool, number or string, not {brief(value)}")


def _param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"'{what}' must be a JSON object")
    return dict(value)


def _list(value: Any, what: str, required: bool = False) -> list[Any]:
    if value is None and required:
        raise InvalidArgument(f"request has no '{what}'")
    if not isinstance(value, list):
        raise InvalidArgument(f"'{what}' must be a JSON array")
    return value


def _text(item: dict[str, Any], key: str, what: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} needs a string '{key}'")
    return value


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(d) for d in value):
        raise InvalidArgument(f"shape of input '{name}' must be an array of integers")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be true or false, not {brief(value)}")
    return value
