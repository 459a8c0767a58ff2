"""Live counts: the binner, merging, bytes between workers, the three windows, and detection end to end."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from gateway.config import DriftWindow
from gateway.drift.kernels import bin_categorical, bin_numeric, bin_output, warm_up
from gateway.drift.profile import build_profile
from gateway.drift.state import Binner, Counts, Window
from gateway.drift.stats import compare, distribution_distance

RNG = np.random.default_rng(11)
REFERENCE = RNG.standard_normal((5000, 4))
REFERENCE[:, 3] = RNG.integers(0, 3, 5000)
PROFILE = build_profile("m", "1", {"x": REFERENCE, "z": REFERENCE[:, 0]}, {"p": RNG.dirichlet(np.ones(3), 5000)}, {"x": [3]})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def clocked(**spec: object) -> tuple[Window, Clock]:
    clock = Clock()
    return Window(DriftWindow(**spec), Binner(PROFILE), clock), clock


def record(window: Window, requests: int) -> None:
    for _ in range(requests):
        window.record(*request())


def request(rows: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    x = RNG.standard_normal((rows, 4)).astype(np.float32)
    x[:, 3] = RNG.integers(0, 4, rows)
    return {"x": x, "z": x[:, :1].copy(), "unknown": x}, {"p": RNG.dirichlet(np.ones(3), rows)}


def test_merging_two_states_equals_observing_everything_in_one():
    binner = Binner(PROFILE)
    requests = [request(int(RNG.integers(1, 9))) for _ in range(50)]
    one, a, b = binner.zeros(), binner.zeros(), binner.zeros()
    for i, (inputs, outputs) in enumerate(requests):
        binner.observe(one, inputs, outputs)
        binner.observe(a if i % 3 else b, inputs, outputs)
    np.testing.assert_array_equal(a.merge(b).data, one.data)
    assert one.features.sum() == 4 * sum(len(i["x"]) for i, _ in requests) + sum(len(i["z"]) for i, _ in requests)


def test_counts_travel_as_bytes_and_scale():
    binner = Binner(PROFILE)
    counts = binner.zeros()
    binner.observe(counts, *request(16))
    counts.n = 16.5
    back = Counts.from_bytes(counts.to_bytes())
    assert back.layout == counts.layout and back.n == 16.5
    np.testing.assert_array_equal(back.data, counts.data)
    np.testing.assert_array_equal(back.probs, counts.probs)
    half = counts.scaled(0.5)
    assert half.n == 8.25 and half.features.sum() == counts.features.sum() / 2 and counts.n == 16.5
    assert counts.zeros_like().features.sum() == 0
    assert counts.data.size == 5 * 11 + 3 * 11 + 3   # features x (10 bins + NaN), classes x (10 bins + NaN), argmax
    with pytest.raises(ValueError, match="not drift counts: counts of this layout hold 91 values, not 90"):
        Counts.from_bytes(counts.to_bytes()[:-8])
    with pytest.raises(ValueError, match="not drift counts"):
        Counts.from_bytes(b"\x01")
    other = Binner(build_profile("m", "2", {"x": REFERENCE}, None, {})).zeros()
    with pytest.raises(ValueError, match="different profiles"):
        counts.merge(other)
    with pytest.raises(ValueError, match="another profile"):
        binner.observe(other, *request())


def test_binner_takes_rows_of_any_dtype_and_refuses_short_tensors():
    binner = Binner(PROFILE)
    warm_up()
    signatures = [len(k.signatures) for k in (bin_numeric, bin_categorical, bin_output)]
    counts = binner.zeros()
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    for variant in (x[0], x.astype(np.int64), x.astype(np.float16), x.astype(">f8"), np.asfortranarray(x),
                    np.frombuffer(x.astype(np.float32).tobytes(), np.float32).reshape(3, 4)):
        binner.observe(counts, {"x": variant})
    assert counts.features.sum() == 4 * (1 + 5 * 3)
    assert [len(k.signatures) for k in (bin_numeric, bin_categorical, bin_output)] == signatures   # no JIT
    with pytest.raises(ValueError, match="tensor 'x' has 2 columns, its drift profile needs >= 4"):
        binner.observe(counts, {"x": x[:, :2].copy()})
    with pytest.raises(ValueError, match="tensor 'x' has shape \\(1, 3, 4\\); drift profiles take \\[B, F\\] or \\[F\\]"):
        binner.observe(counts, {"x": x[None]})
    with pytest.raises(ValueError, match="tensor 'p' has 4 columns, its drift profile needs 3"):
        binner.observe(counts, {}, {"p": np.full((1, 4), 0.25)})
    binner.observe(counts, {}, {"p": np.full((2, 3), 1 / 3, np.float16)})
    assert counts.argmax[0] == 2


def test_count_window_tumbles_every_size_requests():
    window, _ = clocked(kind="count", size=10)
    record(window, 7)
    assert window.judged().n == 7 and window.completed is None   # before a full window: the current
    record(window, 8)
    judged = window.judged()
    assert judged.n == 10 and window.current.n == 5
    record(window, 1)
    assert window.judged() is judged and judged.features[0].sum() == 10


def test_time_window_tumbles_on_the_clock():
    window, clock = clocked(kind="time", seconds=60)
    record(window, 5)
    clock.now += 30
    snapshot = window.judged()
    record(window, 1)
    assert snapshot.n == 5 and window.current.n == 6   # judged() is a snapshot: later records leave it
    clock.now += 31                                    # 61 s: the next request opens a new window
    record(window, 1)
    assert window.judged().n == 6 and window.current.n == 1
    clock.now += 60                                    # 121 s: rotated by judged() without a request
    assert window.judged().n == 1 and window.current.n == 0
    clock.now += 200                                   # windows passed with no request: the last one is empty
    assert window.judged().n == 0


def test_decaying_window_halves_every_half_life():
    window, clock = clocked(kind="decay", half_life_s=100)
    record(window, 80)
    clock.now += 100
    judged = window.judged()
    assert judged.n == pytest.approx(40) and judged.features[0].sum() == pytest.approx(40)
    clock.now += 200
    record(window, 10)
    assert window.judged().n == pytest.approx((40 + 10) / 4)   # recorded after the last tick: decayed from it
    record(window, 10)
    assert window.judged().n == pytest.approx(12.5 + 10)       # no time passed: no decay


def test_distribution_distance_compares_argmax_of_two_versions():
    a, b = Binner(PROFILE), Binner(build_profile("m", "2", {"x": REFERENCE}, {"p": RNG.dirichlet(np.ones(3), 100)}, {}))
    ca, cb = a.zeros(), b.zeros()
    a.observe(ca, {}, {"p": np.array([[0.8, 0.1, 0.1]] * 30 + [[0.1, 0.8, 0.1]] * 10)})
    b.observe(cb, {}, {"p": np.array([[0.8, 0.1, 0.1]] * 10 + [[0.1, 0.8, 0.1]] * 30)})
    assert distribution_distance(ca, cb, "p") == pytest.approx(jensenshannon([3, 1, 0], [1, 3, 0], base=2), abs=1e-12)
    with pytest.raises(ValueError, match="no output 'q'"):
        distribution_distance(ca, cb, "q")


def test_outputs_are_read_by_tensor_and_reported_by_name():
    profile = replace(PROFILE, outputs=(replace(PROFILE.outputs[0], name="risk"),))
    binner = Binner(profile)
    counts = binner.zeros()
    binner.observe(counts, {}, {"p": np.array([[0.1, 0.1, 0.8]] * 5)})
    report = compare(profile, counts)
    assert list(report.outputs) == ["risk"] and counts.argmax[binner.layout.classes("risk")].tolist() == [0, 0, 5]
    assert report.outputs["risk"]["argmax_js"] == pytest.approx(
        jensenshannon(profile.outputs[0].reference_argmax, [0, 0, 5], base=2), abs=1e-12)


def test_mean_shift_on_two_features_is_found_and_no_shift_finds_nothing():
    """Reference N(0, 1) on 8 features; 1,000 requests of one row, features 2 and 5 shifted by 0.5 sd."""
    reference = np.random.default_rng(1).standard_normal((10000, 8))
    profile = build_profile("m", "1", {"x": reference}, None, {})
    results = {}
    for shift in (0.0, 0.5):
        window = Window(DriftWindow(kind="count", size=1000), Binner(profile))
        rng = np.random.default_rng(2)
        for _ in range(1000):
            x = rng.standard_normal(8).astype(np.float32)
            x[[2, 5]] += shift
            window.record({"x": x})
        report = compare(profile, window.judged())
        assert report.n == 1000
        results[shift] = {name: stats["psi"] for name, stats in report.features.items()}
    print("PSI, no shift:", {k: round(v, 4) for k, v in results[0.0].items()})
    print("PSI, x[2] and x[5] shifted 0.5 sd:", {k: round(v, 4) for k, v in results[0.5].items()})
    assert [name for name, value in results[0.5].items() if value > 0.2] == ["x[2]", "x[5]"]
    assert all(value < 0.2 for value in results[0.0].values())
