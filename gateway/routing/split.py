"""Splitting traffic between targets by weight: at random per request, or sticky per key.

Sticky keys use weighted rendezvous hashing (highest random weight): each target scores
-weight / ln(u) with u a uniform hash of (key, target); the highest score wins. A key's winner
depends only on the key and the weights, so it never moves while weights stay fixed, and when a
weight changes only the keys whose winner changed move (the minimum possible).
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")
_SCALE = 1.0 / 2**64


class Split(Generic[T]):
    """Targets with positive weights; `pick` draws at random, `pick_sticky` hashes a key."""

    def __init__(self, weighted: Sequence[tuple[T, str, int]]) -> None:
        live = [(item, name, weight) for item, name, weight in weighted if weight > 0]
        self.items = [item for item, _, _ in live]
        self._bounds = []
        total = 0
        for _, _, weight in live:
            total += weight
            self._bounds.append(total)
        self._total = total
        self._sticky = [(item, weight, hashlib.blake2b(name.encode(), digest_size=16).digest()) for item, name, weight in live]

    def __bool__(self) -> bool:
        return bool(self.items)

    def pick(self, draw: float | None = None) -> T:
        """A target chosen with probability proportional to its weight."""
        x = (random.random() if draw is None else draw) * self._total
        return self.items[bisect.bisect_right(self._bounds, x)] if len(self.items) > 1 else self.items[0]

    def pick_sticky(self, key: str) -> T:
        """The rendezvous winner for key: stable at fixed weights, minimal movement on change."""
        if len(self._sticky) == 1:
            return self._sticky[0][0]
        data = key.encode()
        best, best_score = self._sticky[0][0], -math.inf
        for item, weight, salt in self._sticky:
            h = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=salt).digest(), "little")
            score = -weight / math.log((h + 0.5) * _SCALE)
            if score > best_score:
                best, best_score = item, score
        return best
