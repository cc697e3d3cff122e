"""Bootstrap intervals of stages/common/stats.py: resample counts by hand, agreement with SciPy's
bootstrap, and coverage of the true value at about the nominal rate in seeded simulations (~5 s)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap as scipy_bootstrap

from stages.common.stats import (
    Interval,
    draw_resamples,
    interval,
    paired_difference,
    percentile_interval,
    ratio_of_sums,
    resample_counts,
    resampled_ratios,
    stack_seeds,
)

LEVEL = 0.95
REPLICATIONS = 400  # coverage estimated with a standard error of 0.011 at 95%: accept 0.92-0.98 (~2.7 SE)
BOOT = 500


def test_resample_counts_are_draws_with_replacement():
    counts = resample_counts(np.random.default_rng(0), n_problems=7, n_boot=500, n_strata=3)
    assert counts.shape == (3, 500, 7)
    assert (counts.sum(axis=2) == 7).all()  # every resample holds P problems
    assert (counts >= 0).all() and counts.dtype == np.float64
    # Each problem is drawn 1 time per resample on average (P draws, each with probability 1/P).
    assert counts.mean() == pytest.approx(1.0)
    assert not np.array_equal(counts[0], counts[1])  # strata are resampled independently


def test_resampled_ratio_is_the_ratio_of_the_weighted_sums():
    num = np.array([[1.0, 0.0, 2.0]])
    den = np.array([[1.0, 1.0, 4.0]])
    counts = np.array([[[3.0, 0.0, 0.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])  # [1, B=3, P=3]
    # (3*1)/(3*1) = 1; (0 + 4)/(1 + 8) = 4/9; (1 + 0 + 2)/(1 + 1 + 4) = 1/2
    assert resampled_ratios(num, den, counts) == pytest.approx([1.0, 4 / 9, 0.5])


def test_a_resample_with_an_empty_denominator_is_undefined_not_zero():
    num, den = np.array([0.0, 1.0]), np.array([0.0, 1.0])
    counts = np.array([[[2.0, 0.0], [0.0, 2.0]]])
    r = resampled_ratios(num, den, counts)
    assert np.isnan(r[0]) and r[1] == 1.0
    assert np.isnan(ratio_of_sums(np.zeros(3), np.zeros(3)))
    iv = interval((np.zeros(3), np.zeros(3)), draw_resamples(1, 3, n_boot=100, seed=0))
    assert np.isnan(iv.estimate) and iv.fmt() == "n/a"


def test_percentile_interval_by_hand():
    reps = np.arange(1, 101, dtype=float)  # 1..100
    iv = percentile_interval(50.0, reps, level=0.9)
    assert (iv.lo, iv.hi) == pytest.approx((np.quantile(reps, 0.05), np.quantile(reps, 0.95)))
    assert iv.excludes(0.0) and not iv.excludes(50.0)
    assert Interval(0.5, 0.4, 0.6).fmt() == "0.500 [0.400, 0.600]"


def test_constant_outcomes_give_a_zero_width_interval():
    iv = interval((np.ones(50), np.ones(50)), draw_resamples(1, 50, n_boot=200, seed=0))
    assert (iv.estimate, iv.lo, iv.hi) == (1.0, 1.0, 1.0)


def test_mean_interval_agrees_with_scipy_percentile_bootstrap():
    """An independent implementation (SciPy) of the same percentile interval on the same data."""
    y = np.random.default_rng(3).binomial(1, 0.3, size=300).astype(float)
    ours = interval((y, np.ones_like(y)), draw_resamples(1, len(y), n_boot=20000, seed=1))
    ref = scipy_bootstrap((y,), np.mean, confidence_level=LEVEL, n_resamples=20000, method="percentile",
                          random_state=np.random.default_rng(2)).confidence_interval
    assert ours.estimate == pytest.approx(y.mean())
    assert ours.lo == pytest.approx(ref.low, abs=0.004) and ours.hi == pytest.approx(ref.high, abs=0.004)


# --- coverage in seeded simulations -----------------------------------------------------------------------
# Problems differ in difficulty (p_i ~ Beta(0.5, 0.75), mean 0.4, most problems nearly always or nearly never solved); the true value of a metric is its
# expectation over that population of problems, which is what resampling problems estimates.


def _coverage(simulate, true_value: float, seed: int, **kw) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for r in range(REPLICATIONS):
        iv = simulate(rng, r, **kw)
        hits += iv.lo <= true_value <= iv.hi
    return hits / REPLICATIONS


def _succ(rng, r, problems=200):
    p = rng.beta(0.5, 0.75, size=problems)
    y = rng.binomial(1, p).astype(float)
    return interval((y, np.ones_like(y)), draw_resamples(1, problems, n_boot=BOOT, seed=r))


def test_interval_of_a_share_covers_the_true_value_at_the_nominal_rate():
    assert 0.92 <= _coverage(_succ, 0.4, seed=10) <= 0.98


def _ratio(rng, r, problems=300):
    # repeat share: of the failed episodes (den, P(fail) = 0.45), those that repeat (num, P = 0.7 given failed)
    den = rng.binomial(1, 0.45, size=problems).astype(float)
    num = den * rng.binomial(1, 0.7, size=problems)
    return interval((num, den), draw_resamples(1, problems, n_boot=BOOT, seed=r))


def test_interval_of_a_ratio_metric_covers_the_true_value_at_the_nominal_rate():
    assert 0.92 <= _coverage(_ratio, 0.7, seed=11) <= 0.98


def _paired(rng, r, problems=200, paired=True):
    # Model b lifts every problem: q = p + 0.2 (1 - p), so the true Succ difference is 0.2 * (1 - 0.4) = 0.12.
    p = rng.beta(0.5, 0.75, size=problems)
    a = rng.binomial(1, p).astype(float)
    b = rng.binomial(1, p + 0.2 * (1 - p)).astype(float)
    ones = np.ones(problems)
    counts = draw_resamples(1, problems, n_boot=BOOT, seed=r)
    if paired:
        return paired_difference((a, ones), (b, ones), counts)
    other = draw_resamples(1, problems, n_boot=BOOT, seed=r + 10**6)  # a resampled apart from b
    reps = resampled_ratios(b, ones, counts) - resampled_ratios(a, ones, other)
    return percentile_interval(b.mean() - a.mean(), reps, LEVEL)


def test_paired_difference_covers_the_true_difference_at_the_nominal_rate():
    assert 0.92 <= _coverage(_paired, 0.12, seed=12) <= 0.98


def test_pairing_narrows_the_interval_when_problems_differ_in_difficulty():
    rng = np.random.default_rng(13)
    paired = [_paired(rng, r) for r in range(50)]
    rng = np.random.default_rng(13)
    unpaired = [_paired(rng, r, paired=False) for r in range(50)]
    width = np.mean([iv.hi - iv.lo for iv in paired])
    assert width < 0.9 * np.mean([iv.hi - iv.lo for iv in unpaired])


def _seeds(rng, r, resampling, problems=150, seeds=3):
    # Three seeds evaluated on the SAME problems: a problem's difficulty is shared by every seed.
    p = rng.beta(0.5, 0.75, size=problems)
    y = rng.binomial(1, np.broadcast_to(p, (seeds, problems))).astype(float)  # [S, P]
    return interval((y, np.ones_like(y)), draw_resamples(seeds, problems, n_boot=BOOT, seed=r, resampling=resampling))


def test_pooled_seeds_on_shared_problems_cover_at_the_nominal_rate():
    assert 0.92 <= _coverage(_seeds, 0.4, seed=14, resampling="problems") <= 0.98


def test_stratified_resampling_undercovers_when_problems_are_shared():
    """Why seeds on shared problems are resampled together: resampling each seed on its own treats the
    three seeds' outcomes on a problem as independent, and the interval is too narrow."""
    assert _coverage(_seeds, 0.4, seed=14, resampling="seeds_as_strata") < 0.88


def _strata(rng, r, problems=150, seeds=3):
    # Each seed has its own problems (same count): now the seeds are independent strata.
    p = rng.beta(0.5, 0.75, size=(seeds, problems))
    y = rng.binomial(1, p).astype(float)
    return interval((y, np.ones_like(y)), draw_resamples(seeds, problems, n_boot=BOOT, seed=r,
                                                         resampling="seeds_as_strata"))


def test_seeds_as_strata_cover_at_the_nominal_rate_when_each_seed_has_its_own_problems():
    assert 0.92 <= _coverage(_strata, 0.4, seed=15) <= 0.98


def test_stack_seeds_pools_per_seed_terms_and_refuses_different_problem_counts():
    num, den = stack_seeds([(np.array([1, 0]), np.array([1, 1])), (np.array([1, 1]), np.array([1, 1]))])
    assert num.shape == (2, 2) and ratio_of_sums(num, den) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="different numbers of problems"):
        stack_seeds([(np.ones(2), np.ones(2)), (np.ones(3), np.ones(3))])
