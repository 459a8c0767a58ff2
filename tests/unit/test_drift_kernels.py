"""The numba kernels bin exactly as np.searchsorted / np.histogram / np.argmax do."""
from __future__ import annotations

import numpy as np
import pytest

from gateway.drift.kernels import bin_categorical, bin_numeric, bin_output, warm_up
from gateway.drift.state import _feature_minor

RNG = np.random.default_rng(7)


def expected_numeric(x: np.ndarray, columns: np.ndarray, edges: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(columns), width))
    for i, (column, e) in enumerate(zip(columns, edges)):
        values = x[:, column].astype(np.float64)
        finite = values[~np.isnan(values)]
        np.add.at(out[i], np.searchsorted(e, finite, side="right"), 1)
        out[i, -1] += np.isnan(values).sum()
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("writable", [True, False])
def test_numeric_bins_equal_searchsorted_with_edge_values_nan_and_infinities(dtype, writable):
    # float32-exact edges, so that in float32 too the values placed on them hit them exactly
    edges = [np.sort(RNG.standard_normal(9)).astype(np.float32).astype(np.float64), np.array([-1.0, 0.0, 0.5]),
             np.empty(0), np.array([0.25])]
    x = RNG.standard_normal((500, 6)).astype(dtype)
    specials = np.concatenate([edges[0], edges[1], [np.nan, np.inf, -np.inf, 0.25, 0.0]]).astype(dtype)
    x[:len(specials), :] = specials[:, None]   # every edge value, NaN, +-inf in every column
    x.flags.writeable = writable
    columns = np.array([5, 0, 2, 3], np.int64)
    counts = np.zeros((6, 12))
    bin_numeric(x, columns, _feature_minor(edges), counts, 2)
    want = expected_numeric(x, columns, edges, 12)
    np.testing.assert_array_equal(counts[2:], want)
    assert counts[:2].sum() == 0
    assert counts[2 + 2, 0] == 500 - np.isnan(x[:, 2]).sum()   # no edges: one bin


def test_numeric_bins_add_to_what_is_there():
    x = RNG.standard_normal((64, 3))
    edges = [np.quantile(x[:, c], [0.25, 0.5, 0.75]) for c in range(3)]
    counts = np.ones((3, 5))
    bin_numeric(x, np.arange(3), _feature_minor(edges), counts, 0)
    np.testing.assert_array_equal(counts, 1 + expected_numeric(x, np.arange(3), edges, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_categorical_bins_by_code_and_the_rest_goes_to_other(dtype):
    codes = [np.array([1.0, 3.0, 7.0]), np.array([0.0, 2.0]), np.array([5.0])]
    x = RNG.choice([0, 1, 2, 3, 4, 5, 7, 8, -1, np.nan, np.inf, -np.inf, 2.5], size=(400, 3)).astype(dtype)
    counts = np.zeros((3, 5))
    bin_categorical(x, np.arange(3, dtype=np.int64), _feature_minor(codes), counts, 0)
    for i, table in enumerate(codes):
        known = np.isin(x[:, i], table)
        want = np.zeros(5)
        np.add.at(want, np.searchsorted(table, x[known, i]), 1)
        want[-1] = (~known).sum()
        np.testing.assert_array_equal(counts[i], want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_bins_equal_histogram_and_argmax(dtype):
    bins, classes = 10, 4
    p = RNG.dirichlet(np.ones(classes), 1000).astype(dtype)
    p[:11, 0] = np.linspace(0, 1, 11)   # every edge exactly
    edges = np.linspace(0, 1, bins + 1)[1:-1]
    probs, argmax = np.zeros((classes + 1, bins + 1)), np.zeros(classes + 1)
    bin_output(p, np.arange(classes, dtype=np.int64), np.repeat(edges[:, None], classes, axis=1), probs, argmax, 1)
    for c in range(classes):
        want, _ = np.histogram(p[:, c].astype(np.float64), np.linspace(0, 1, bins + 1))
        np.testing.assert_array_equal(probs[1 + c, :bins], want)
    np.testing.assert_array_equal(argmax[1:], np.bincount(p.argmax(axis=1), minlength=classes))
    assert probs[0].sum() == 0 and argmax[0] == 0 and probs[:, -1].sum() == 0


def test_output_nan_goes_to_the_last_column_and_out_of_range_is_clipped():
    p = np.array([[np.nan, 0.7, 0.3], [np.nan, np.nan, np.nan], [-0.5, 1.5, 0.0], [0.2, 0.2, 0.1]])
    edges = np.repeat(np.array([0.5])[:, None], 3, axis=1)
    probs, argmax = np.zeros((3, 3)), np.zeros(3)
    bin_output(p, np.arange(3, dtype=np.int64), edges, probs, argmax, 0)
    np.testing.assert_array_equal(probs, [[2, 0, 2], [1, 2, 1], [3, 0, 1]])
    np.testing.assert_array_equal(argmax, [1, 2, 0])   # NaN ignored, an all-NaN row uncounted, ties to the first


def test_after_warm_up_nothing_compiles():
    warm_up()
    kernels = (bin_numeric, bin_categorical, bin_output)
    before = [len(k.signatures) for k in kernels]
    assert min(before) >= 4   # float32/float64, writable/read-only
    assert warm_up() < 1.0 and [len(k.signatures) for k in kernels] == before
    with pytest.raises(TypeError, match="No matching definition"):   # refused, not compiled on a request
        bin_numeric(np.zeros((1, 1), np.int64), np.zeros(1, np.int64), np.zeros((1, 1)), np.zeros((1, 2)), 0)
