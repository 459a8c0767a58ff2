"""Drift statistics against scipy and plain numpy on the same binned data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp
from scipy.spatial.distance import jensenshannon

from gateway.drift.stats import EPS, chi2, chi2_sf, js_distance, ks_binned, psi

PAIRS = [
    (np.array([500, 300, 150, 50]), np.array([450, 320, 170, 60])),
    (np.array([10, 0, 5, 1, 0, 7]), np.array([0, 3, 5, 9, 0, 2])),          # empty bins on either side
    (np.random.default_rng(1).integers(0, 1000, 40), np.random.default_rng(2).integers(0, 1000, 40)),
    (np.array([0.5, 2.25, 7.0]), np.array([1.75, 0.125, 3.5])),              # decayed, fractional counts
]


@pytest.mark.parametrize("ref, cur", PAIRS)
def test_psi_js_ks_equal_their_reference_formulas(ref, cur):
    p, q = ref / ref.sum(), cur / cur.sum()
    pe, qe = np.maximum(p, EPS), np.maximum(q, EPS)
    assert psi(ref, cur) == pytest.approx(np.sum((qe - pe) * np.log(qe / pe)), abs=1e-9)
    assert js_distance(ref, cur) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-9)
    assert ks_binned(ref, cur) == pytest.approx(np.max(np.abs(np.cumsum(p) - np.cumsum(q))), abs=1e-9)


@pytest.mark.parametrize("ref, cur", PAIRS)
def test_chi2_equals_scipy_chisquare_on_the_bins_it_keeps(ref, cur):
    keep = (ref > 0) | (cur > 0)
    p = np.maximum(ref[keep] / ref.sum(), EPS)
    expected = p / p.sum() * cur[keep].sum()
    want = sp.chisquare(cur[keep], expected)
    statistic, p_value = chi2(ref, cur)
    assert statistic == pytest.approx(want.statistic, rel=1e-9)
    assert p_value == pytest.approx(want.pvalue, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30, 100, 255])
def test_chi2_survival_function_equals_scipy(df):
    for x in np.concatenate([[0.0, 1e-6, 0.5], np.linspace(0.1, 4, 13) * df, [df + 60.0, 10.0 * df + 300]]):
        assert chi2_sf(float(x), df) == pytest.approx(sp.chi2.sf(x, df), rel=1e-9, abs=1e-13), x


def test_identical_distributions_score_zero_and_disjoint_ones_the_maximum():
    ref = np.array([5, 10, 20, 0])
    assert psi(ref, 2 * ref) == pytest.approx(0) and js_distance(ref, 3 * ref) == pytest.approx(0, abs=1e-7)
    assert ks_binned(ref, ref) == 0 and chi2(ref, ref) == (0.0, 1.0)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0) and ks_binned([1, 0], [0, 1]) == 1.0


def test_an_empty_side_is_not_judged():
    assert math.isnan(psi([1, 2], [0, 0])) and math.isnan(js_distance([0, 0], [1, 2]))
    assert math.isnan(ks_binned([1, 2], [0, 0])) and all(math.isnan(v) for v in chi2([1, 2], [0, 0]))
    assert chi2([5, 0], [7, 0]) == (0.0, 1.0)   # one bin left: nothing to test
    with pytest.raises(ValueError, match="bins differ"):
        psi([1, 2], [1, 2, 3])


def test_a_code_the_reference_never_saw_weighs_heavily_but_finitely():
    statistic, p_value = chi2(np.array([500, 500, 0]), np.array([480, 480, 40]))
    assert math.isfinite(statistic) and p_value < 1e-12
    assert math.isfinite(psi([500, 500, 0], [480, 480, 40]))
