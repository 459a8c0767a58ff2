"""Access rules from routing.yaml, compiled once per routing snapshot: who may infer, read
metadata or use the admin API, on which models. Decisions are cached per caller, model and
action, so the request path pays one dict lookup."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence

from gateway.config import AccessRule
from gateway.errors import PermissionDenied, Unauthenticated
from gateway.security.principal import Principal

ACTIONS = ("infer", "metadata", "admin", "feedback")
_MAX_CACHED = 50_000


class Policy:
    """No rules at all (no `access` section): inference and metadata are open to every caller and
    the admin API is closed. With rules: only what some rule allows."""

    def __init__(self, rules: Sequence[AccessRule] | None) -> None:
        self.rules = rules
        self._cache: dict[tuple[Principal | None, str, str], str | None] = {}

    def rule_for(self, principal: Principal | None, model: str, action: str) -> str | None:
        """The name of the first rule allowing this, or None when none does."""
        key = (principal, model, action)
        try:
            return self._cache[key]
        except KeyError:
            pass
        if self.rules is None:
            found: str | None = None if action == "admin" else "open"
        else:
            found = next((r.name for r in self.rules if action in r.actions and _matches(r, principal)
                          and any(fnmatchcase(model, m) for m in r.models)), None)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = found
        return found

    def check(self, principal: Principal | None, model: str, action: str) -> None:
        """Raise Unauthenticated (no credentials) or PermissionDenied (known, not allowed)."""
        if self.rule_for(principal, model, action) is not None:
            return
        what = "the admin API" if action == "admin" else f"{action} on model '{model}'"
        if principal is None:
            raise Unauthenticated(f"credentials required for {what}: a client certificate or a bearer token")
        raise PermissionDenied(f"'{principal.name}' may not use {what}")


def _matches(rule: AccessRule, principal: Principal | None) -> bool:
    """`anonymous: true` matches every caller, credentials or not; otherwise a caller matches by a
    principal glob, a group, or all the listed claims."""
    if principal is None or rule.anonymous:
        return rule.anonymous
    if any(fnmatchcase(principal.name, p) for p in rule.principals):
        return True
    if principal.groups.intersection(rule.groups):
        return True
    return bool(rule.claims) and all(_claim_holds(principal.claims.get(k), v) for k, v in rule.claims.items())


def _claim_holds(value: object, wanted: str | list[str]) -> bool:
    """A claim equals the wanted value (or one of them); a list claim need only contain one."""
    options = [wanted] if isinstance(wanted, str) else wanted
    values = value if isinstance(value, list) else [value]
    return any(str(v) in options for v in values)
