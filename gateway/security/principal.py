"""Who is calling: the identity a client certificate or a bearer token proves."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True, slots=True, eq=False)
class Principal:
    """A verified caller. Compared by identity: the identity caches hand out one object per
    certificate or token, which access decisions are cached against."""

    name: str                                   # SPIFFE id / DNS name / CN, or the token's principal claim
    via: str                                    # "cert" or "jwt"
    groups: frozenset[str] = frozenset()        # the token's groups claim
    claims: Mapping[str, Any] = field(default_factory=dict)  # all verified token claims
