"""Statistics of live counts against a reference, on binned counts (not raw values), off the
request path. Each takes two count vectors over the same bins (any scale: they are normalized)
and gives NaN when either side has no observations: nothing to judge yet.

EPS: where a formula divides by or takes the log of a proportion (PSI, the chi-squared
expectation), proportions are floored at EPS = 1e-4, so a bin one side never saw weighs a lot
instead of infinitely."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gateway.drift.profile import Profile
from gateway.drift.state import Counts, Layout

EPS = 1e-4


def _proportions(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    ref, cur = np.asarray(ref, np.float64), np.asarray(cur, np.float64)
    if ref.shape != cur.shape:
        raise ValueError(f"bins differ: {ref.shape} and {cur.shape}")
    r, c = ref.sum(), cur.sum()
    return (ref / r, cur / c) if r > 0 and c > 0 else None


def psi(ref: np.ndarray, cur: np.ndarray) -> float:
    """Population stability index: sum (q - p) ln(q / p), proportions floored at EPS."""
    pq = _proportions(ref, cur)
    if pq is None:
        return math.nan
    p, q = np.maximum(pq[0], EPS), np.maximum(pq[1], EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(ref: np.ndarray, cur: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2, in [0, 1] (scipy.spatial.distance.jensenshannon(p, q, base=2))."""
    pq = _proportions(ref, cur)
    if pq is None:
        return math.nan
    p, q = pq
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        inside = a > 0
        return float(np.sum(a[inside] * np.log2(a[inside] / m[inside])))

    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def ks_binned(ref: np.ndarray, cur: np.ndarray) -> float:
    """Largest absolute difference of the binned CDFs (the NaN / other bin sorts last, as NaN in np.sort)."""
    pq = _proportions(ref, cur)
    return math.nan if pq is None else float(np.max(np.abs(np.cumsum(pq[0]) - np.cumsum(pq[1]))))


def chi2(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-squared test of cur against ref's proportions: (statistic, p-value), as
    scipy.stats.chisquare(cur, expected). Bins empty on both sides are left out (they would only
    add degrees of freedom); expected = ref proportions floored at EPS, renormalized, times cur's
    total. Decayed (fractional) counts are taken as they are. (0, 1) when one bin is left."""
    pq = _proportions(ref, cur)
    if pq is None:
        return math.nan, math.nan
    seen = (pq[0] > 0) | (pq[1] > 0)
    if seen.sum() < 2:
        return 0.0, 1.0
    observed = np.asarray(cur, np.float64)[seen]
    p = np.maximum(pq[0][seen], EPS)
    expected = p / p.sum() * observed.sum()
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return statistic, chi2_sf(statistic, int(seen.sum()) - 1)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-squared(df): the regularized upper incomplete gamma Q(df/2, x/2), by
    its series below a + 1 and Lentz's continued fraction above (Numerical Recipes 6.2)."""
    if x <= 0:
        return 1.0
    a, x = df / 2, x / 2
    scale = math.exp(a * math.log(x) - x - math.lgamma(a))
    if x < a + 1:
        term = total = 1 / a
        for k in range(1, 100000):
            term *= x / (a + k)
            total += term
            if term < total * 1e-16:
                break
        return max(1.0 - scale * total, 0.0)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return scale * h


@dataclass(frozen=True)
class Report:
    """Statistics of one Counts against its profile: per feature {psi, js, ks} (numeric) or
    {psi, js, chi2, chi2_p} (categorical), per output {argmax_js, prob_js (mean over classes)}."""

    n: float
    features: dict[str, dict[str, float]]
    outputs: dict[str, dict[str, float]]


def _as_reference(row: np.ndarray, bins: int) -> np.ndarray:
    """A counts row cut to the reference's bins: the first bins - 1, then the last column (NaN / other)."""
    return np.append(row[:bins - 1], row[-1])


def compare(profile: Profile, counts: Counts) -> Report:
    """Judge counts (from a Binner of this profile) against the profile's reference."""
    if counts.layout != Layout.of(profile):
        raise ValueError(f"counts are not of the profile of {profile.model!r} version {profile.version!r}")
    rows = {name: i for i, name in enumerate(counts.layout.features)}
    features = {}
    for f in profile.features:
        cur = _as_reference(counts.features[rows[f.name]], len(f.reference))
        stats = {"psi": psi(f.reference, cur), "js": js_distance(f.reference, cur)}
        if f.kind == "numeric":
            stats["ks"] = ks_binned(f.reference, cur)
        else:
            stats["chi2"], stats["chi2_p"] = chi2(f.reference, cur)
        features[f.name] = stats
    outputs = {}
    for o in profile.outputs:
        classes = counts.layout.classes(o.name)
        prob_js = [js_distance(np.append(ref, 0), _as_reference(cur, len(o.edges) + 2))   # the reference has no NaN
                   for ref, cur in zip(o.reference_probs, counts.probs[classes])]
        outputs[o.name] = {"argmax_js": js_distance(o.reference_argmax, counts.argmax[classes]),
                           "prob_js": float(np.mean(prob_js))}
    return Report(counts.n, features, outputs)


def distribution_distance(a: Counts, b: Counts, output: str) -> float:
    """Jensen-Shannon distance between two counts' argmax distributions of output (the rollout
    gate: canary against primary); NaN while either has none."""
    return js_distance(a.argmax[a.layout.classes(output)], b.argmax[b.layout.classes(output)])
