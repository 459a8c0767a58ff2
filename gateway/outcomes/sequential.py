"""An always-valid sequential comparison of a candidate arm with the primary arm on one outcome
stream: a mixture sequential probability ratio test (mSPRT) and its confidence sequence, safe to
look at after every observation, and the verdict of a non-inferiority rollout gate.

Notation. Each arm is summarised by (n, sum x, sum x²) — a SQL `count(*), sum(x), sum(x*x)`.
θ = μ_candidate − μ_primary; θ̂ = x̄_candidate − x̄_primary; V = s²_c / n_c + s²_p / n_p with the
plug-in (divide-by-n) variances s², which for 0/1 outcomes are exactly the Bernoulli p̂(1 − p̂).
The normal approximation takes θ̂ ~ N(θ, V) at every look.

mSPRT (Johari, Koomen, Pekelis & Walsh, "Always valid inference", 2017/2022): against
H0: θ = θ0, mixing the alternative over θ ~ N(θ0, τ²),

    Λ(θ0) = sqrt(V / (V + τ²)) · exp( τ² (θ̂ − θ0)² / (2 V (V + τ²)) ).

Under H0, Λ is (in information time 1/V) a nonnegative martingale with mean 1, so by Ville's
inequality P(Λ ever ≥ 1/α) ≤ α: rejecting when Λ ≥ 1/α, or using p = min(1, 1/Λ), keeps the
type-I error ≤ α however often one looks. Inverting it gives the confidence sequence
{θ0 : Λ(θ0) < 1/α}, the normal-mixture boundary (Robbins 1970; Howard, Ramdas, McAuliffe &
Sekhon 2021, with intrinsic time 1/V and ρ = 1/τ²):

    θ̂ ± sqrt( V (V + τ²) / τ² · (2 ln(1/α) + ln((V + τ²) / V)) ),

which covers θ at every n at once with probability ≥ 1 − α. τ (the mixing scale) decides where
the boundary is tightest: near V ≈ τ² / (2 ln(1/α)), i.e. when the standard error has shrunk to
about τ / 2.5. Its default is the margin (the boundary is tightest where the margin becomes
resolvable); with a zero margin, DEFAULT_EFFECT pooled standard deviations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["worse", "not_worse", "undecided"]
Value = float | np.ndarray

DEFAULT_EFFECT = 0.1   # mixing scale τ, in pooled standard deviations, when the margin is 0


@dataclass(frozen=True, slots=True)
class Arm:
    """One arm's sufficient statistics: count, sum and sum of squares of its outcomes. The fields
    may also be numpy arrays of one shape (many streams at once): every function here but
    `decide` then works elementwise."""

    n: int | np.ndarray
    total: Value
    squares: Value

    @property
    def mean(self) -> Value:
        return self.total / self.n

    @property
    def variance(self) -> Value:
        """The plug-in (divide-by-n) variance; for 0/1 outcomes exactly p̂(1 − p̂)."""
        return np.maximum(self.squares / self.n - self.mean ** 2, 0.0)


def _estimate(candidate: Arm, primary: Arm) -> tuple[Value, Value]:
    """θ̂ = x̄_c − x̄_p and its variance V = s²_c / n_c + s²_p / n_p."""
    return (candidate.mean - primary.mean,
            candidate.variance / candidate.n + primary.variance / primary.n)


def log_likelihood_ratio(candidate: Arm, primary: Arm, tau: Value, theta0: float = 0.0) -> Value:
    """ln Λ(θ0), the mSPRT statistic against θ = θ0 with a N(θ0, τ²) mixture (module docstring);
    ln Λ ≥ ln(1/α) rejects θ = θ0 at level α, at any look."""
    estimate, v = _estimate(candidate, primary)
    t2 = tau * tau
    return 0.5 * np.log(v / (v + t2)) + t2 * (estimate - theta0) ** 2 / (2 * v * (v + t2))


def confidence_sequence(candidate: Arm, primary: Arm, alpha: float, tau: Value) -> tuple[Value, Value, Value]:
    """(θ̂, lower, upper): the always-valid 1 − α confidence sequence for candidate − primary,
    θ̂ ± sqrt(V (V + τ²) / τ² · (2 ln(1/α) + ln((V + τ²) / V)))."""
    estimate, v = _estimate(candidate, primary)
    t2 = tau * tau
    half = np.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + np.log((v + t2) / v)))
    return estimate, estimate - half, estimate + half


def mixing_scale(margin: float, candidate: Arm, primary: Arm) -> Value:
    """The default τ: the margin when it is positive, else DEFAULT_EFFECT pooled standard
    deviations of the two arms."""
    if margin > 0:
        return margin
    pooled = (candidate.n * candidate.variance + primary.n * primary.variance) / (candidate.n + primary.n)
    return DEFAULT_EFFECT * np.sqrt(pooled)


@dataclass(frozen=True, slots=True)
class Decision:
    """A gate's verdict at one look, with the confidence sequence for candidate − primary, the
    always-valid p-value for "no difference" (min(1, 1/Λ(0)) at this look) and a reason naming
    the numbers."""

    verdict: Verdict
    estimate: float
    lower: float
    upper: float
    p_value: float
    reason: str


def decide(candidate: Arm, primary: Arm, *, margin: float = 0.0, alpha: float = 0.05,
           higher_is_better: bool = True, min_n: int = 100, tau: float | None = None) -> Decision:
    """The non-inferiority verdict at this look, from the 1 − α confidence sequence [lo, hi] of
    candidate − primary, oriented so that negative is worse:
    "not_worse" when its worse-side bound is within the margin (lo > −margin), else "worse"
    when it lies wholly on the worse side of 0 (hi < 0), else "undecided" — also below min_n
    observations in either arm and while neither arm varies. A candidate proven worse by less
    than the margin is "not_worse": the margin is what the rollout accepts. Each verdict is
    wrong with probability ≤ α over all looks ("worse" when θ = 0; "not_worse" when θ = −margin).
    tau: the mixing scale (default `mixing_scale`)."""
    if margin < 0 or not 0 < alpha < 1 or min_n < 2:
        raise ValueError(f"need margin >= 0, 0 < alpha < 1 and min_n >= 2, got {margin}, {alpha}, {min_n}")
    counts = f"{candidate.n} candidate / {primary.n} primary observations"
    if min(candidate.n, primary.n) < min_n:
        return Decision("undecided", math.nan, -math.inf, math.inf, 1.0,
                        f"{counts}: at least {min_n} per arm are needed")
    tau = float(mixing_scale(margin, candidate, primary)) if tau is None else tau
    if not (candidate.variance > 0 or primary.variance > 0) or not tau > 0:
        return Decision("undecided", float(candidate.mean - primary.mean), -math.inf, math.inf, 1.0,
                        f"{counts}: no variation observed yet")
    estimate, lower, upper = (float(x) for x in confidence_sequence(candidate, primary, alpha, tau))
    p_value = math.exp(-max(float(log_likelihood_ratio(candidate, primary, tau)), 0.0))
    lo, hi = (lower, upper) if higher_is_better else (-upper, -lower)
    better = "higher" if higher_is_better else "lower"
    stated = (f"candidate − primary = {estimate:+.4g}, {100 * (1 - alpha):g}% confidence sequence "
              f"[{lower:+.4g}, {upper:+.4g}] ({better} is better; {counts}; always-valid p = {p_value:.3g})")
    if lo > -margin:
        return Decision("not_worse", estimate, lower, upper, p_value,
                        f"not worse than the primary by more than the margin {margin:g}: {stated}")
    if hi < 0:
        return Decision("worse", estimate, lower, upper, p_value, f"worse than the primary: {stated}")
    return Decision("undecided", estimate, lower, upper, p_value,
                    f"undecided (margin {margin:g}): {stated}")
