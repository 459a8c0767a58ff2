"""Online quality from predictions joined with their outcomes: pure functions over numpy arrays.

Every metric is built from per-row terms (`classifier_terms`, `regressor_terms`); the array
metrics aggregate them and the per-observation increments (Prometheus counters at join time)
are the same terms for one row, so counters summed over rows equal the array results.

Scores to probabilities (`probabilities`), per row: a row with every score in [0, 1] summing to
1 within PROBABILITY_TOLERANCE is taken as probabilities; any other row gets a softmax. A
one-column output is P(class 1) when in [0, 1], else a logit (sigmoid); it becomes [1 − p, p].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Sequence, TypeVar

import numpy as np

EPS = 1e-15                     # log-loss clips the true class's probability to [EPS, 1]
PROBABILITY_TOLERANCE = 1e-3    # how far from 1 a row of probabilities may sum
BINS = 10                       # calibration bins: equal width over the top-class probability [0, 1]

T = TypeVar("T")


def probabilities(scores: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Class probabilities [N, C] from scores [N, C] (module docstring: which rows get a softmax)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"scores must be [rows, classes], got shape {s.shape}")
    if s.shape[1] == 1:
        p = s[:, 0]
        p = np.where((p >= 0) & (p <= 1), p, 0.5 * (1 + np.tanh(p / 2)))
        return np.column_stack([1 - p, p])
    is_prob = np.all((s >= 0) & (s <= 1), axis=1) & (np.abs(s.sum(axis=1) - 1) <= PROBABILITY_TOLERANCE)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return np.where(is_prob[:, None], s, e / e.sum(axis=1, keepdims=True))


def calibration_bin(confidence: np.ndarray, bins: int = BINS) -> np.ndarray:
    """The calibration bin of each top-class probability: floor(p · bins), 1.0 in the last bin."""
    return np.minimum((np.asarray(confidence) * bins).astype(np.int64), bins - 1)


@dataclass(frozen=True, slots=True)
class ClassifierTerms:
    """Per-row terms of a classifier's quality: top class right?, log-loss, calibration bin and
    top-class probability (the confidence)."""

    correct: np.ndarray
    log_loss: np.ndarray
    bin: np.ndarray
    confidence: np.ndarray


def classifier_terms(scores: np.ndarray | Sequence[Sequence[float]], labels: np.ndarray | Sequence[float],
                     bins: int = BINS) -> ClassifierTerms:
    """Per-row terms from scores [N, C] and class-index labels [N] (floats holding integers)."""
    p = probabilities(scores)
    y = np.asarray(labels, np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"{len(p)} score rows but {len(y)} labels")
    if np.any((y != np.round(y)) | (y < 0) | (y >= p.shape[1])):
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]})")
    y = y.astype(np.int64)
    rows = np.arange(len(p))
    top = p.argmax(axis=1)
    confidence = p[rows, top]
    return ClassifierTerms(top == y, -np.log(np.clip(p[rows, y], EPS, 1.0)),
                           calibration_bin(confidence, bins), confidence)


class ClassifierIncrement(NamedTuple):
    """One joined row's contribution to a classifier's counters."""

    correct: bool
    log_loss: float
    calib_bin: int
    confidence: float


def classifier_increments(scores_row: Sequence[float], label: float, bins: int = BINS) -> ClassifierIncrement:
    """`classifier_terms` of one row: what a join adds to the counters."""
    t = classifier_terms([scores_row], [label], bins)
    return ClassifierIncrement(bool(t.correct[0]), float(t.log_loss[0]), int(t.bin[0]), float(t.confidence[0]))


@dataclass(frozen=True, slots=True)
class Calibration:
    """Per calibration bin: rows, rows whose top class was right, and the sum of their top-class
    probabilities (all three are counter-friendly sums)."""

    count: np.ndarray
    correct: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error Σ_b (n_b / N) |acc_b − conf_b| = Σ_b |correct_b − conf_sum_b| / N."""
        n = self.count.sum()
        return float(np.abs(self.correct - self.confidence).sum() / n) if n else math.nan


def calibration(terms: ClassifierTerms, bins: int = BINS) -> Calibration:
    """Calibration-bin sums of per-row terms."""
    def per_bin(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(terms.bin, weights, minlength=bins)[:bins]
    return Calibration(per_bin(None), per_bin(terms.correct.astype(np.float64)), per_bin(terms.confidence))


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else math.nan


@dataclass(frozen=True, slots=True)
class ClassifierQuality:
    """A classifier's accuracy, mean log-loss and expected calibration error over n rows."""

    n: int
    accuracy: float
    log_loss: float
    ece: float
    calibration: Calibration


def classifier_quality(scores: np.ndarray | Sequence[Sequence[float]], labels: np.ndarray | Sequence[float],
                       bins: int = BINS) -> ClassifierQuality:
    """Quality of scores [N, C] against class-index labels [N]."""
    t = classifier_terms(scores, labels, bins)
    cal = calibration(t, bins)
    return ClassifierQuality(len(t.correct), _mean(t.correct), _mean(t.log_loss), cal.ece, cal)


@dataclass(frozen=True, slots=True)
class RegressorTerms:
    """Per-row absolute and squared errors."""

    abs_err: np.ndarray
    sq_err: np.ndarray


def regressor_terms(predictions: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[float]) -> RegressorTerms:
    """Per-row errors of predictions [N] (or [N, 1]) against labels [N]."""
    err = np.asarray(predictions, np.float64).reshape(-1) - np.asarray(labels, np.float64).reshape(-1)
    return RegressorTerms(np.abs(err), err * err)


def regressor_increments(prediction: float, label: float) -> tuple[float, float]:
    """(absolute error, squared error) of one row: what a join adds to the counters."""
    t = regressor_terms([prediction], [label])
    return float(t.abs_err[0]), float(t.sq_err[0])


@dataclass(frozen=True, slots=True)
class RegressorQuality:
    """A regressor's mean absolute and root mean squared error over n rows."""

    n: int
    mae: float
    rmse: float


def regressor_quality(predictions: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[float]) -> RegressorQuality:
    """MAE and RMSE of predictions [N] (or [N, 1]) against labels [N]."""
    t = regressor_terms(predictions, labels)
    return RegressorQuality(len(t.abs_err), _mean(t.abs_err), math.sqrt(_mean(t.sq_err)))


def rate(values: np.ndarray | Sequence[float]) -> float:
    """The rate of a 0/1 business outcome (NaN with none)."""
    v = np.asarray(values, np.float64)
    if np.any((v != 0) & (v != 1)):
        raise ValueError("a rate needs 0/1 outcomes")
    return _mean(v)


def mean(values: np.ndarray | Sequence[float]) -> float:
    """The mean of a business value (NaN with none)."""
    return _mean(np.asarray(values, np.float64))


def per_segment(segments: np.ndarray | Sequence[str], compute: Callable[[np.ndarray], T]) -> dict[str, T]:
    """compute(indices of a segment's rows) for every segment value, in sorted order; e.g.
    `per_segment(country, lambda i: classifier_quality(scores[i], labels[i]))`."""
    values, inverse = np.unique(np.asarray(segments, str), return_inverse=True)
    return {str(v): compute(np.flatnonzero(inverse == k)) for k, v in enumerate(values)}


# ---------------------------------------------------------------------------------------------
# Disparity between segments


class _Metric(NamedTuple):
    test: Literal["two-proportion z", "Welch t"]
    root: bool                  # the metric is sqrt(mean of the terms) (RMSE over squared errors)
    higher_is_better: bool


METRICS: dict[str, _Metric] = {
    "accuracy": _Metric("two-proportion z", False, True),    # terms: ClassifierTerms.correct
    "rate": _Metric("two-proportion z", False, True),        # terms: the 0/1 outcome
    "log_loss": _Metric("Welch t", False, False),            # terms: ClassifierTerms.log_loss
    "mae": _Metric("Welch t", False, False),                 # terms: RegressorTerms.abs_err
    "rmse": _Metric("Welch t", True, False),                 # terms: RegressorTerms.sq_err (tests the MSE)
    "mean": _Metric("Welch t", False, True),                 # terms: the value
}


@dataclass(frozen=True, slots=True)
class SegmentDisparity:
    """One segment: its rows, metric, difference and ratio to the reference, the p-value of it
    against the rest of the rows (NaN when either has fewer than min_n) and whether it is
    flagged (worse than the rest beyond the threshold, significantly)."""

    segment: str
    n: int
    value: float
    difference: float
    ratio: float
    p_value: float
    flagged: bool


@dataclass(frozen=True, slots=True)
class DisparityReport:
    """A metric per value of one segment attribute, against the best (or the overall) value."""

    attribute: str
    metric: str
    test: str
    reference: Literal["best", "overall"]
    reference_value: float
    n: int
    overall: float
    threshold: float
    alpha: float
    tested: int
    rows: list[SegmentDisparity]

    @property
    def flagged(self) -> list[str]:
        return [r.segment for r in self.rows if r.flagged]


def disparity(segments: np.ndarray | Sequence[str], terms: np.ndarray | Sequence[float], metric: str, *,
              attribute: str = "segment", reference: Literal["best", "overall"] = "best",
              higher_is_better: bool | None = None, threshold: float = 0.05, alpha: float = 0.05,
              min_n: int = 30) -> DisparityReport:
    """Compare a metric across segments. terms: per-row terms whose mean is the metric (METRICS
    names them; RMSE takes squared errors). Each segment is tested against the rest of the rows
    — two-proportion z-test (pooled) for accuracy and rate, Welch's t-test otherwise — and
    flagged when it is worse than the rest by more than threshold (metric units) with
    p < alpha / (segments tested) (Bonferroni). Segments or rests under min_n rows are shown,
    not tested. The best segment is the best among those with min_n rows (all when none has)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    spec = METRICS[metric]
    hib = spec.higher_is_better if higher_is_better is None else higher_is_better
    x = np.asarray(terms, np.float64).reshape(-1)
    seg = np.asarray(segments, str).reshape(-1)
    if len(seg) != len(x):
        raise ValueError(f"{len(seg)} segment values but {len(x)} terms")

    def value(t: np.ndarray) -> float:
        m = _mean(t)
        return math.sqrt(m) if spec.root else m

    groups = per_segment(seg, lambda i: i)
    values = {s: value(x[i]) for s, i in groups.items()}
    testable = {s for s, i in groups.items() if len(i) >= min_n and len(x) - len(i) >= min_n}
    overall = value(x)
    if reference == "overall":
        ref = overall
    else:
        pool = [values[s] for s, i in groups.items() if len(i) >= min_n] or list(values.values())
        ref = max(pool) if hib else min(pool)
    rows = []
    for s, i in groups.items():
        p, flagged = math.nan, False
        if s in testable:
            rest = np.delete(x, i)
            p = _two_proportion_p(x[i], rest) if spec.test == "two-proportion z" else _welch_p(x[i], rest)
            shortfall = (value(rest) - values[s]) * (1 if hib else -1)
            flagged = shortfall > threshold and p < alpha / len(testable)
        rows.append(SegmentDisparity(s, len(i), values[s], values[s] - ref,
                                     values[s] / ref if ref else math.nan, p, flagged))
    return DisparityReport(attribute, metric, spec.test, reference, ref, len(x), overall, threshold, alpha,
                           len(testable), rows)


def _two_proportion_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of the pooled two-proportion z-test of 0/1 samples a and b."""
    pooled = (a.sum() + b.sum()) / (len(a) + len(b))
    se = math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    if se == 0:
        return 1.0
    return math.erfc(abs(a.mean() - b.mean()) / se / math.sqrt(2))


def _welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances, Welch–Satterthwaite degrees of
    freedom); with no variance in either sample, 1 when the means are equal, else 0."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = a.mean() - b.mean()
    if va + vb == 0:
        return 1.0 if diff == 0 else 0.0
    t2 = diff * diff / (va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return _betainc(df / 2, 0.5, df / (df + t2))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b), by Lentz's continued fraction on the side
    where it converges fast (Numerical Recipes 6.4); P(|T_df| > t) = I_{df/(df+t²)}(df/2, 1/2)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1 - front * _beta_fraction(b, a, 1 - x) / b
    return front * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    def nonzero(v: float) -> float:
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 10000):
        for step in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / nonzero(1 + step * d)
            c = nonzero(1 + step / c)
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def render_markdown(report: DisparityReport) -> str:
    """The report as a Markdown table, columns padded so it also reads as plain text."""
    flag_rule = (f"flag: worse than the rest by > {report.threshold:g} with p < {report.alpha:g}/{max(report.tested, 1)} "
                 f"({report.test} test, each segment against the rest)")
    head = (f"{report.metric} by {report.attribute}: overall {report.overall:.4g} over {report.n} rows; "
            f"reference ({report.reference}) {report.reference_value:.4g}; {flag_rule}")
    table = [["segment", "n", report.metric, "difference", "ratio", "p-value", "flag"]]
    table += [[r.segment, str(r.n), f"{r.value:.4g}", f"{r.difference:+.4g}", f"{r.ratio:.3f}",
               "—" if math.isnan(r.p_value) else f"{r.p_value:.3g}", "FLAG" if r.flagged else ""]
              for r in report.rows]
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([head, "", line(table[0]), rule, *(line(r) for r in table[1:])]) + "\n"
