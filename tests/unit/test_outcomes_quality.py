"""Online quality metrics against their formulas written out here, per segment against a plain
numpy group-by, the disparity report on biased and unbiased synthetic data, and the per-row
increments summing to the array results."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from gateway.outcomes.quality import (
    EPS, classifier_increments, classifier_quality, classifier_terms, disparity, mean, per_segment,
    probabilities, rate, regressor_increments, regressor_quality, regressor_terms, render_markdown,
)

RNG = np.random.default_rng(11)
N, C = 3000, 4


def softmax_rows(x: np.ndarray) -> np.ndarray:
    return np.array([[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in x])


def dataset(rng: np.random.Generator = RNG) -> tuple[np.ndarray, np.ndarray]:
    """Half the rows probabilities (Dirichlet), half raw logits; labels mostly the top class."""
    probs = rng.dirichlet(np.ones(C), N // 2)
    logits = rng.normal(0, 2, (N - N // 2, C))
    scores = np.vstack([probs, logits])
    top = np.vstack([probs, softmax_rows(logits)]).argmax(axis=1)
    labels = np.where(rng.random(N) < 0.7, top, rng.integers(0, C, N)).astype(np.float64)
    return scores, labels


def direct_ece(p: np.ndarray, labels: np.ndarray, bins: int) -> float:
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf >= lo) & ((conf < hi) if b < bins - 1 else (conf <= hi))
        if inside.any():
            total += inside.sum() / len(p) * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


def test_probability_rows_are_kept_and_other_rows_get_a_softmax():
    scores = np.array([[0.2, 0.5, 0.3], [2.0, -1.0, 0.5], [0.2, 0.2, 0.2], [0.5, 0.5, 0.0]])
    got = probabilities(scores)
    assert np.allclose(got[[0, 3]], scores[[0, 3]])
    assert np.allclose(got[[1, 2]], softmax_rows(scores[[1, 2]]))
    one = probabilities(np.array([[0.8], [2.0]]))                       # P(class 1), then a logit
    assert np.allclose(one, [[0.2, 0.8], [1 - 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-2))]])
    big = probabilities(np.array([[1000.0, 0.0]]))                      # no overflow
    assert np.allclose(big, [[1.0, 0.0]])


@pytest.mark.parametrize("bins", [10, 15])
def test_classifier_metrics_equal_their_formulas(bins):
    scores, labels = dataset()
    q = classifier_quality(scores, labels, bins)
    p = np.vstack([scores[: N // 2], softmax_rows(scores[N // 2:])])
    y = labels.astype(int)
    assert q.n == N
    assert q.accuracy == pytest.approx(np.mean(p.argmax(axis=1) == y))
    assert q.log_loss == pytest.approx(-np.mean([math.log(max(p[i, y[i]], EPS)) for i in range(N)]), rel=1e-12)
    assert q.ece == pytest.approx(direct_ece(p, labels, bins), rel=1e-12)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    idx = np.minimum(np.floor(conf * bins).astype(int), bins - 1)
    assert q.calibration.count.tolist() == [int((idx == b).sum()) for b in range(bins)]
    assert q.calibration.correct.tolist() == [int(correct[idx == b].sum()) for b in range(bins)]
    assert q.calibration.confidence == pytest.approx([conf[idx == b].sum() for b in range(bins)])


def test_log_loss_clips_a_zero_probability_and_labels_must_be_class_indices():
    t = classifier_terms([[1.0, 0.0], [0.0, 1.0]], [1, 1])
    assert t.log_loss.tolist() == pytest.approx([-math.log(EPS), 0.0])
    assert t.bin.tolist() == [9, 9] and t.correct.tolist() == [False, True]
    for bad in ([2], [-1], [0.5]):
        with pytest.raises(ValueError, match="class indices"):
            classifier_terms([[0.5, 0.5]], bad)
    with pytest.raises(ValueError, match="labels"):
        classifier_terms([[0.5, 0.5]], [0, 1])


def test_regressor_metrics_equal_their_formulas():
    pred, label = RNG.normal(0, 3, (500, 1)), RNG.normal(0, 3, 500)
    q = regressor_quality(pred, label)
    err = [float(a) - float(b) for a, b in zip(pred[:, 0], label)]
    assert q.n == 500
    assert q.mae == pytest.approx(sum(abs(e) for e in err) / 500, rel=1e-12)
    assert q.rmse == pytest.approx(math.sqrt(sum(e * e for e in err) / 500), rel=1e-12)


def test_business_outcomes_are_a_rate_of_0_1_or_a_mean():
    assert rate([1, 0, 0, 1, 1]) == 0.6 and mean([2.5, 3.5, 6.0]) == 4.0
    assert math.isnan(rate([])) and math.isnan(mean([]))
    with pytest.raises(ValueError, match="0/1"):
        rate([1, 2])


def test_increments_summed_over_rows_equal_the_array_results():
    scores, labels = dataset(np.random.default_rng(12))
    bins = 10
    count, correct, confidence = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    right, loss = 0, 0.0
    for row, label in zip(scores.tolist(), labels.tolist()):
        inc = classifier_increments(row, label, bins)
        right += inc.correct
        loss += inc.log_loss
        count[inc.calib_bin] += 1
        correct[inc.calib_bin] += inc.correct
        confidence[inc.calib_bin] += inc.confidence
    q = classifier_quality(scores, labels, bins)
    assert right / N == pytest.approx(q.accuracy) and loss / N == pytest.approx(q.log_loss, rel=1e-12)
    assert count.tolist() == q.calibration.count.tolist() and correct.tolist() == q.calibration.correct.tolist()
    assert np.abs(correct - confidence).sum() / N == pytest.approx(q.ece, rel=1e-12)   # ECE from counters

    pred, label = RNG.normal(0, 1, 300), RNG.normal(0, 1, 300)
    sums = np.sum([regressor_increments(a, b) for a, b in zip(pred.tolist(), label.tolist())], axis=0)
    r = regressor_quality(pred, label)
    assert sums[0] / 300 == pytest.approx(r.mae) and math.sqrt(sums[1] / 300) == pytest.approx(r.rmse)


def test_per_segment_metrics_equal_a_numpy_group_by():
    scores, labels = dataset(np.random.default_rng(13))
    country = np.random.default_rng(14).choice(["de", "fr", "us", "jp"], N)
    got = per_segment(country, lambda i: classifier_quality(scores[i], labels[i]))
    assert list(got) == ["de", "fr", "jp", "us"]
    for value in np.unique(country):
        mask = country == value
        want = classifier_quality(scores[mask], labels[mask])
        assert got[value].n == mask.sum()
        assert (got[value].accuracy, got[value].log_loss, got[value].ece) == pytest.approx(
            (want.accuracy, want.log_loss, want.ece))


def biased(rng: np.random.Generator, accuracy: dict[str, float], n: int = 6000) -> tuple[np.ndarray, np.ndarray]:
    """Segment values and 0/1 correctness with each segment's own accuracy."""
    names = list(accuracy)
    seg = rng.choice(names, n, p=[0.4, 0.3, 0.2, 0.1][: len(names)])
    p = np.array([accuracy[s] for s in seg])
    return seg, (rng.random(n) < p).astype(np.float64)


def test_disparity_flags_the_segment_the_model_serves_worse_and_only_it():
    seg, correct = biased(np.random.default_rng(15), {"a": 0.85, "b": 0.85, "c": 0.85, "d": 0.70})
    report = disparity(seg, correct, "accuracy", attribute="region")
    assert report.flagged == ["d"] and report.tested == 4 and report.test == "two-proportion z"
    rows = {r.segment: r for r in report.rows}
    best = max(correct[seg == s].mean() for s in "abcd")
    assert report.reference_value == pytest.approx(best)
    for s, r in rows.items():
        mine, rest = correct[seg == s], correct[seg != s]
        pooled = correct.mean()
        z = (mine.mean() - rest.mean()) / math.sqrt(pooled * (1 - pooled) * (1 / len(mine) + 1 / len(rest)))
        assert r.n == len(mine) and r.value == pytest.approx(mine.mean())
        assert r.difference == pytest.approx(mine.mean() - best) and r.ratio == pytest.approx(mine.mean() / best)
        assert r.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)

    table = render_markdown(report)
    assert "accuracy by region" in table and "two-proportion z" in table
    d_line = next(line for line in table.splitlines() if line.startswith("| d "))
    assert "FLAG" in d_line and f"{rows['d'].value:.4g}" in d_line
    assert sum("FLAG" in line for line in table.splitlines()) == 1


def test_disparity_flags_nothing_without_bias_and_leaves_small_segments_untested():
    seg, correct = biased(np.random.default_rng(16), {"a": 0.8, "b": 0.8, "c": 0.8, "d": 0.8})
    seg = seg.astype("<U8")
    seg[:10] = "tiny"
    report = disparity(seg, correct, "accuracy", reference="overall", min_n=30)
    assert report.flagged == [] and report.reference_value == pytest.approx(correct.mean())
    tiny = next(r for r in report.rows if r.segment == "tiny")
    assert tiny.n == 10 and math.isnan(tiny.p_value) and report.tested == 4


def test_disparity_of_an_error_metric_uses_welch_and_lower_is_better():
    rng = np.random.default_rng(17)
    seg = rng.choice(["x", "y", "z"], 3000)
    err = rng.normal(0, np.where(seg == "z", 2.0, 1.0))
    terms = regressor_terms(err, np.zeros(3000))
    report = disparity(seg, terms.sq_err, "rmse", threshold=0.2)
    assert report.flagged == ["z"] and report.test == "Welch t"
    rows = {r.segment: r for r in report.rows}
    for s in "xyz":
        mine, rest = terms.sq_err[seg == s], terms.sq_err[seg != s]
        assert rows[s].value == pytest.approx(math.sqrt(mine.mean()))
        assert rows[s].p_value == pytest.approx(sp.ttest_ind(mine, rest, equal_var=False).pvalue, rel=1e-9, abs=1e-300)
    assert report.reference_value == pytest.approx(min(rows[s].value for s in "xyz"))   # the best is the lowest
    mae = disparity(seg, terms.abs_err, "mae", threshold=0.2)
    assert mae.flagged == ["z"]
    with pytest.raises(ValueError, match="unknown metric"):
        disparity(seg, terms.abs_err, "auc")
