"""The retry budget: retries may add at most `ratio` of the request load (Envoy's idea). Each
request deposits `ratio` of a token, each retry spends one; a small reserve lets the first
failures of a quiet period retry too."""
from __future__ import annotations

import random


class RetryBudget:
    def __init__(self, ratio: float, reserve: float = 10.0) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self._tokens = reserve if ratio > 0 else 0.0

    def deposit(self) -> None:
        """One request arrived."""
        self._tokens = min(self._tokens + self.ratio, self.reserve)

    def withdraw(self) -> bool:
        """May one retry go out now?"""
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def jittered(mean_s: float) -> float:
    """A pause between half and one and a half times the mean, so retries do not march in step."""
    return mean_s * (0.5 + random.random())
