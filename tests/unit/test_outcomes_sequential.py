"""The always-valid sequential test under continuous monitoring: thousands of simulated A/B
streams (vectorised: every stream's arms are arrays, looked at after every batch), the error
rates the rollout gate's verdicts keep, and a naive peeked z-test that does not."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest

from gateway.outcomes.sequential import (
    Arm, confidence_sequence, decide, log_likelihood_ratio, mixing_scale,
)

RUNS = 2000
ALPHA = 0.05
TOLERANCE = 3 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)   # three binomial standard errors of a rate α over RUNS
MIN_N = 100
Draw = Callable[[np.random.Generator, tuple[int, int]], np.ndarray]


def bernoulli(p: float | np.ndarray) -> Draw:
    return lambda rng, shape: (rng.random(shape) < p).astype(np.float64)


def normal(mean: float, sd: float = 1.0) -> Draw:
    return lambda rng, shape: rng.normal(mean, sd, shape)


def exponential(mean: float) -> Draw:
    return lambda rng, shape: rng.exponential(mean, shape)


def arm(rng: np.random.Generator, draw: Draw, per_batch: int, batches: int) -> Arm:
    """RUNS streams of one arm, as cumulative sufficient statistics [RUNS, batches] after each batch."""
    x = np.stack([draw(rng, (RUNS, per_batch)) for _ in range(batches)], axis=1)   # [RUNS, batches, per_batch]
    n = np.broadcast_to(per_batch * np.arange(1, batches + 1), (RUNS, batches))
    return Arm(n, x.sum(axis=2).cumsum(axis=1), (x * x).sum(axis=2).cumsum(axis=1))


def simulate(candidate: Draw, primary: Draw, *, seed: int, batches: int = 100,
             per_batch: tuple[int, int] = (10, 40)) -> tuple[Arm, Arm]:
    """Candidate and primary arms of RUNS streams; by default the candidate gets 20% of traffic
    (10 and 40 observations a batch), looked at after each of 100 batches, from n = MIN_N on."""
    rng = np.random.default_rng(seed)
    c, p = arm(rng, candidate, per_batch[0], batches), arm(rng, primary, per_batch[1], batches)
    first = max(math.ceil(MIN_N / k) for k in per_batch) - 1
    return (Arm(c.n[:, first:], c.total[:, first:], c.squares[:, first:]),
            Arm(p.n[:, first:], p.total[:, first:], p.squares[:, first:]))


def ever(c: Arm, p: Arm, margin: float, higher_is_better: bool = True) -> tuple[float, float]:
    """Shares of streams that are ever "worse" / ever "not_worse", as `decide` defines them."""
    _, lower, upper = confidence_sequence(c, p, ALPHA, mixing_scale(margin, c, p))
    lo, hi = (lower, upper) if higher_is_better else (-upper, -lower)
    not_worse = lo > -margin
    worse = (hi < 0) & ~not_worse
    return float(worse.any(axis=1).mean()), float(not_worse.any(axis=1).mean())


NULL = [   # no true difference: (candidate, primary, margin, higher_is_better)
    pytest.param(bernoulli(0.1), bernoulli(0.1), 0.02, True, id="binary"),
    pytest.param(bernoulli(0.3), bernoulli(0.3), 0.0, False, id="binary-no-margin"),
    pytest.param(normal(5.0, 2.0), normal(5.0, 2.0), 0.2, True, id="normal"),
    pytest.param(exponential(0.2), exponential(0.2), 0.0, False, id="skewed"),
]


@pytest.mark.parametrize("candidate, primary, margin, higher_is_better", NULL)
def test_with_no_difference_worse_is_declared_at_most_alpha_of_the_time_under_continuous_looks(
        candidate, primary, margin, higher_is_better):
    c, p = simulate(candidate, primary, seed=1)
    worse, _ = ever(c, p, margin, higher_is_better)
    assert worse <= ALPHA + TOLERANCE, worse


@pytest.mark.parametrize("candidate, primary, margin, higher_is_better", NULL)
def test_a_fixed_sample_z_test_peeked_at_every_look_declares_worse_far_more_often(
        candidate, primary, margin, higher_is_better):
    c, p = simulate(candidate, primary, seed=1)
    estimate = (c.mean - p.mean) * (1 if higher_is_better else -1)
    z = estimate / np.sqrt(c.variance / c.n + p.variance / p.n)
    naive = float((z < -1.6449).any(axis=1).mean())          # one-sided 5% at each look
    sequential, _ = ever(c, p, margin, higher_is_better)
    assert naive > 3 * ALPHA and naive > 5 * sequential, (naive, sequential)


@pytest.mark.parametrize("candidate, primary, margin, higher_is_better", [
    pytest.param(bernoulli(0.05), bernoulli(0.1), 0.02, True, id="binary"),
    pytest.param(normal(0.3), normal(0.0), 0.05, False, id="normal-lower-is-better"),
])
def test_a_clearly_worse_candidate_is_found_worse_in_at_least_90_percent_of_runs(
        candidate, primary, margin, higher_is_better):
    c, p = simulate(candidate, primary, seed=2)
    worse, not_worse = ever(c, p, margin, higher_is_better)
    assert worse >= 0.9 and not_worse <= ALPHA + TOLERANCE, (worse, not_worse)


@pytest.mark.parametrize("candidate, primary, margin, higher_is_better", [
    pytest.param(bernoulli(0.1), bernoulli(0.1), 0.04, True, id="binary-equal"),
    pytest.param(normal(-0.05), normal(0.0), 0.15, False, id="normal-better"),
])
def test_an_equal_or_better_candidate_reaches_not_worse_in_most_runs(candidate, primary, margin, higher_is_better):
    c, p = simulate(candidate, primary, seed=3)
    worse, not_worse = ever(c, p, margin, higher_is_better)
    assert not_worse >= 0.75 and worse <= ALPHA + TOLERANCE, (not_worse, worse)


@pytest.mark.parametrize("candidate, primary, margin", [
    pytest.param(bernoulli(0.07), bernoulli(0.1), 0.03, id="binary"),
    pytest.param(normal(-0.2), normal(0.0), 0.2, id="normal"),
])
def test_a_candidate_exactly_at_the_margin_is_passed_at_most_alpha_of_the_time(candidate, primary, margin):
    c, p = simulate(candidate, primary, seed=4)
    _, not_worse = ever(c, p, margin)
    assert not_worse <= ALPHA + TOLERANCE, not_worse


def test_decide_gives_the_vectorised_verdict_on_sampled_looks():
    spread = np.linspace(0.03, 0.13, RUNS)[:, None]     # each stream its own candidate rate
    c, p = simulate(bernoulli(spread), bernoulli(0.1), seed=5, batches=40)
    margin = 0.03
    _, lower, upper = confidence_sequence(c, p, ALPHA, margin)
    rng = np.random.default_rng(6)
    seen = set()
    for run, look in zip(rng.integers(0, RUNS, 400), rng.integers(0, c.n.shape[1], 400)):
        one = [Arm(int(a.n[run, look]), float(a.total[run, look]), float(a.squares[run, look])) for a in (c, p)]
        d = decide(*one, margin=margin, alpha=ALPHA, min_n=MIN_N)
        want = ("not_worse" if lower[run, look] > -margin else
                "worse" if upper[run, look] < 0 else "undecided")
        assert d.verdict == want and (d.lower, d.upper) == pytest.approx((lower[run, look], upper[run, look]))
        seen.add(d.verdict)
    assert seen == {"worse", "not_worse", "undecided"}


def test_the_confidence_sequence_is_where_the_msprt_does_not_reject():
    c, p = Arm(800, 76.0, 76.0), Arm(3200, 330.0, 330.0)
    for tau in (0.005, 0.02, 0.1):
        estimate, lower, upper = confidence_sequence(c, p, ALPHA, tau)
        assert estimate == pytest.approx(76 / 800 - 330 / 3200)
        for bound in (lower, upper):
            assert log_likelihood_ratio(c, p, tau, bound) == pytest.approx(math.log(1 / ALPHA))
        assert log_likelihood_ratio(c, p, tau, estimate) < math.log(1 / ALPHA)


def test_the_msprt_is_johari_et_al_s_two_sample_normal_formula_with_equal_arms():
    rng = np.random.default_rng(7)
    x, y = rng.normal(0.0, 1.5, 500), rng.normal(0.2, 1.5, 500)
    n, tau = 500, 0.1
    c, p = (Arm(n, float(v.sum()), float((v * v).sum())) for v in (y, x))
    sigma2 = (x.var() + y.var()) / 2        # their σ², here the two arms' plug-in variances averaged
    diff = y.mean() - x.mean()
    want = (math.sqrt(2 * sigma2 / (2 * sigma2 + n * tau ** 2))
            * math.exp(n * n * tau ** 2 * diff ** 2 / (4 * sigma2 * (2 * sigma2 + n * tau ** 2))))
    assert math.exp(log_likelihood_ratio(c, p, tau)) == pytest.approx(want, rel=1e-12)


def test_a_binary_arm_has_the_bernoulli_variance_and_the_mixing_scale_follows_the_margin():
    a = Arm(50, 12.0, 12.0)
    assert a.mean == 0.24 and a.variance == pytest.approx(0.24 * 0.76)
    assert mixing_scale(0.03, a, a) == 0.03
    b = Arm(150, 150 * 2.0, 150 * (4.0 + 9.0))    # mean 2, variance 9
    assert mixing_scale(0.0, a, b) == pytest.approx(0.1 * math.sqrt((50 * 0.24 * 0.76 + 150 * 9) / 200))


def test_decide_waits_for_min_n_per_arm_and_for_variation():
    d = decide(Arm(99, 0.0, 0.0), Arm(5000, 900.0, 900.0), min_n=100)
    assert d.verdict == "undecided" and "99 candidate / 5000 primary" in d.reason and "100 per arm" in d.reason
    d = decide(Arm(400, 0.0, 0.0), Arm(400, 0.0, 0.0))
    assert d.verdict == "undecided" and "no variation" in d.reason


def test_decide_names_the_numbers_and_flips_with_the_direction():
    c, p = Arm(2000, 100.0, 100.0), Arm(8000, 800.0, 800.0)       # 5% against 10%
    up = decide(c, p, margin=0.01, higher_is_better=True)
    assert up.verdict == "worse" and up.upper < 0 and up.p_value <= ALPHA
    assert f"{up.estimate:+.4g}" in up.reason and f"[{up.lower:+.4g}, {up.upper:+.4g}]" in up.reason
    assert "95% confidence sequence" in up.reason and "2000 candidate / 8000 primary" in up.reason
    down = decide(c, p, margin=0.01, higher_is_better=False)       # an error rate: lower is better
    assert down.verdict == "not_worse" and "margin 0.01" in down.reason
    assert (down.lower, down.upper) == (up.lower, up.upper)


def test_a_candidate_proven_worse_by_less_than_the_margin_is_not_worse():
    c, p = Arm(200_000, 19_000.0, 19_000.0), Arm(200_000, 20_000.0, 20_000.0)   # 9.5% against 10%
    assert decide(c, p, margin=0.0, tau=0.005).verdict == "worse"
    assert decide(c, p, margin=0.01).verdict == "not_worse"


def test_decide_rejects_bad_parameters():
    a = Arm(500, 50.0, 50.0)
    for kwargs in ({"margin": -0.1}, {"alpha": 0.0}, {"alpha": 1.0}, {"min_n": 1}):
        with pytest.raises(ValueError):
            decide(a, a, **kwargs)
