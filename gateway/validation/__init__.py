"""Edge validation: Triton's input schema plus a route's YAML constraints, compiled per target."""
from gateway.validation.schema import RETRY_S, Schemas, Validator, Violation, compile_validator

__all__ = ["RETRY_S", "Schemas", "Validator", "Violation", "compile_validator"]
