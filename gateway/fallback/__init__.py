"""Rule-engine answers for a model whose backend cannot answer: ordered CEL conditions over
named input features, compiled at config load (see rules.py)."""
from gateway.fallback.rules import RuleSet, compile_condition

__all__ = ["RuleSet", "compile_condition"]
