"""What inline drift costs per request, in-process: `Window.record` (numba kernels) against the
same binning in plain numpy (np.searchsorted per feature + np.add.at), and one `compare` of 64
features. Prints a markdown table (targets: <= 3 µs at B=1, F=64; <= 30 µs at B=64).

    .venv/bin/python bench/drift_cost.py
"""
from __future__ import annotations

import platform
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import DriftWindow  # noqa: E402
from gateway.drift.kernels import warm_up  # noqa: E402
from gateway.drift.profile import Profile, build_profile  # noqa: E402
from gateway.drift.state import Binner, Window  # noqa: E402
from gateway.drift.stats import compare  # noqa: E402

CLASSES = 10


def best_us(stmt, number: int) -> float:
    """µs per call, best of 15 runs (the quietest: this is a shared, noisy machine's floor)."""
    return min(timeit.repeat(stmt, number=number, repeat=15)) / number * 1e6


def numpy_record(profile: Profile, counts: np.ndarray, probs: np.ndarray, argmax: np.ndarray, inputs, outputs) -> None:
    """The same work without numba: one searchsorted + add.at per feature (and per class)."""
    x = np.atleast_2d(inputs["x"])
    for i, f in enumerate(profile.features):
        np.add.at(counts[i], np.searchsorted(f.edges, x[:, f.column], "right"), 1)
    if outputs is not None:
        p = outputs["p"]
        edges = profile.outputs[0].edges
        for c in range(p.shape[1]):
            np.add.at(probs[c], np.searchsorted(edges, p[:, c], "right"), 1)
        np.add.at(argmax, p.argmax(axis=1), 1)


def row(features: int, batch: int, with_output: bool) -> tuple[str, float, float]:
    rng = np.random.default_rng(0)
    outputs = {"p": rng.dirichlet(np.ones(CLASSES), 2000)} if with_output else None
    profile = build_profile("m", "1", {"x": rng.standard_normal((2000, features))}, outputs, {})
    window = Window(DriftWindow(kind="count", size=10**9), Binner(profile))
    x = rng.standard_normal((batch, features)).astype(np.float32)
    inputs = {"x": np.frombuffer(x.tobytes(), np.float32).reshape(x.shape if batch > 1 else (features,))}  # as decoded
    live = {"p": np.frombuffer(rng.dirichlet(np.ones(CLASSES), batch).astype(np.float32).tobytes(),
                               np.float32).reshape(batch, CLASSES)} if with_output else None
    counts, probs, argmax = np.zeros((features, 11)), np.zeros((CLASSES, 10)), np.zeros(CLASSES)
    number = 5000 if batch == 1 else 500
    label = f"B={batch}, F={features}" + (f", {CLASSES}-class output" if with_output else "")
    return (label, best_us(lambda: window.record(inputs, live), number),
            best_us(lambda: numpy_record(profile, counts, probs, argmax, inputs, live), number // 10))


def main() -> int:
    print(f"warm_up (numba cache loaded or compiled): {warm_up() * 1e3:.0f} ms; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    print("| per request | Window.record (numba) µs | plain numpy µs | speed-up |")
    print("|---|---:|---:|---:|")
    for features, batch, with_output in [(8, 1, False), (64, 1, False), (8, 64, False), (64, 64, False),
                                         (64, 1, True), (64, 64, True)]:
        label, numba_us, numpy_us = row(features, batch, with_output)
        print(f"| {label} | {numba_us:.2f} | {numpy_us:.1f} | {numpy_us / numba_us:.0f}x |")
    rng = np.random.default_rng(1)
    profile = build_profile("m", "1", {"x": rng.standard_normal((5000, 64))}, {"p": rng.dirichlet(np.ones(CLASSES), 5000)}, {})
    binner = Binner(profile)
    counts = binner.zeros()
    binner.observe(counts, {"x": rng.standard_normal((1000, 64))}, {"p": rng.dirichlet(np.ones(CLASSES), 1000)})
    print(f"\ncompare(profile, counts), F=64 + a {CLASSES}-class output (off the request path): "
          f"{best_us(lambda: compare(profile, counts), 10) / 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
