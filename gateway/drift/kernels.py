"""Numba kernels that add a request's values into histogram counts, compiled ahead of serving
(`warm_up`) and free of the GIL. Every kernel adds 1.0 into `counts[first + i, bin]` for row
feature i, and the last column of `counts` is the bin for values that fit no other: NaN (numeric
features, probabilities) or a code outside the table and NaN (categorical features).

Inputs are C-contiguous float32 or float64 [B, F] arrays, writable or read-only (zero-copy views
of request bytes are read-only, and numba compiles those separately): the four signatures per
kernel `warm_up` compiles before it turns compiling off. Callers convert anything else."""
from __future__ import annotations

import time

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def bin_numeric(x, columns, edges, counts, first):
    """Feature i reads column columns[i] and falls in bin = count of edges[:, i] <= value, i.e.
    np.searchsorted(edges[:, i], value, "right"). edges is feature-minor [E_max, F], padded with
    NaN (a compare with NaN is false, so padding never counts, even for +inf): branch-free compares
    that vectorize across features."""
    features = columns.shape[0]
    missing = counts.shape[1] - 1
    values = np.empty(features)
    bins = np.empty(features, np.int64)
    for b in range(x.shape[0]):
        for i in range(features):
            values[i] = x[b, columns[i]]
            bins[i] = 0
        for e in range(edges.shape[0]):
            for i in range(features):
                bins[i] += values[i] >= edges[e, i]
        for i in range(features):
            counts[first + i, bins[i] if values[i] == values[i] else missing] += 1.0


@njit(nogil=True, cache=True)
def bin_categorical(x, columns, codes, counts, first):
    """Feature i reads column columns[i]; a value equal to codes[k, i] falls in bin k, any other
    value (NaN included) in the last column. codes is feature-minor [K_max, F], each column sorted
    and padded with NaN; k = count of codes below the value (branch-free), then one equality test."""
    size = codes.shape[0]
    other = counts.shape[1] - 1
    for b in range(x.shape[0]):
        for i in range(columns.shape[0]):
            value = x[b, columns[i]]
            k = 0
            for e in range(size):
                k += codes[e, i] < value
            counts[first + i, k if k < size and codes[k, i] == value else other] += 1.0


@njit(nogil=True, cache=True)
def bin_output(p, columns, edges, probs, argmax, first):
    """Class probabilities [B, C]: each class's probability binned as bin_numeric does (edges
    [bins - 1, C]: a value below 0 lands in the first bin, above 1 in the last, NaN in the last
    column), and argmax[first + the row's most probable class] += 1. NaN probabilities take no
    part in the argmax (a row of NaN counts for no class); ties go to the first class, as np.argmax."""
    bin_numeric(p, columns, edges, probs, first)
    for b in range(p.shape[0]):
        best, top = 0.0, -1
        for c in range(columns.shape[0]):
            value = p[b, c]
            if value == value and (top < 0 or value > best):
                best, top = value, c
        if top >= 0:
            argmax[first + top] += 1.0


def warm_up() -> float:
    """Compile (or load from numba's on-disk cache) every signature the binner uses, then turn
    compiling off, so no request ever waits for the JIT (another argument type raises TypeError
    instead). Returns the seconds it took."""
    start = time.perf_counter()
    columns, table = np.zeros(1, np.int64), np.zeros((1, 1))
    for dtype in (np.float32, np.float64):
        for writable in (True, False):
            x = np.zeros((1, 1), dtype)
            x.flags.writeable = writable
            counts = np.zeros((1, 2))
            bin_numeric(x, columns, table, counts, 0)
            bin_categorical(x, columns, table, counts, 0)
            bin_output(x, columns, table, counts, np.zeros(1), 0)
    for kernel in (bin_numeric, bin_categorical, bin_output):
        kernel.disable_compile()
    return time.perf_counter() - start
