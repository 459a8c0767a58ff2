"""Inline drift statistics: reference profiles, numba binning kernels, mergeable windowed counts
and the statistics that compare them."""
