"""Bootstrap intervals for evaluation metrics, computed from per-problem outcome arrays.

Every evaluation metric is a ratio of sums over problems (see `stages/common/metrics.py`): Succ@k is
(episodes solved within k turns) / (episodes), the repeat share is (failed episodes that repeat an
answer) / (failed episodes), and so on. One model's outcomes on one evaluation set are therefore two
arrays `num`, `den` of shape [S, P]: S seeds (S = 1 inside one pipeline run; an ablation pools its
seeds) by P problems, the same P problems for every seed and every model.

The interval is the bootstrap percentile interval (Efron & Tibshirani, *An Introduction to the
Bootstrap*, 1993, ch. 13) over problems: the unit that is sampled from a population is the problem,
so problems are what is resampled. Two schemes for pooling seeds:

- `"problems"` (default): one resample of problems, shared by every seed (a cluster bootstrap with the
  problem as the cluster; Davison & Hinkley, *Bootstrap Methods and their Application*, 1997, §3.8).
  Right when the seeds were evaluated on the same problems: a hard problem is hard for every seed, and
  only a shared resample carries that correlation into the interval.
- `"seeds_as_strata"`: every seed resampled on its own (a stratified bootstrap, D&H §3.7). Right when
  each seed has its own problems; on shared problems it understates the interval (the test
  `test_stratified_resampling_undercovers_when_problems_are_shared` shows by how much).

Neither includes training-seed variance (another trained model per seed): with 3 seeds there is too
little to resample; report the per-seed estimates beside the pooled one for that.

A paired difference between two models uses the SAME resamples for both (resampling problems, not
models), so the problem difficulty they share cancels out and the interval is much narrower than two
separate intervals suggest.

Everything is numpy and vectorised: a resample is a row of per-problem counts, and every metric of
every model on a set is evaluated against the same [B, P] count matrix with one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

#: How seeds are pooled when resampling; see the module docstring.
Resampling = Literal["problems", "seeds_as_strata"]
#: (numerator, denominator) of a ratio-of-sums metric, per problem: arrays [S, P] (or [P] for one seed).
Terms = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval at `level`; nan where the metric is undefined (e.g.
    the repeat share of a model that never fails)."""

    estimate: float
    lo: float
    hi: float
    level: float = 0.95

    def excludes(self, value: float = 0.0) -> bool:
        """True when the whole interval lies strictly on one side of `value`."""
        return bool(self.lo > value or self.hi < value)

    def fmt(self, digits: int = 3) -> str:
        if np.isnan(self.estimate):
            return "n/a"
        return f"{self.estimate:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def as_seeds_by_problems(a: np.ndarray) -> np.ndarray:
    """[P] -> [1, P]; [S, P] unchanged."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        return a[None, :]
    if a.ndim != 2:
        raise ValueError(f"outcome arrays are [P] or [S, P], got shape {a.shape}")
    return a


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> float:
    """sum(num) / sum(den) over all seeds and problems; nan when the denominator is 0."""
    d = float(np.sum(den))
    return float(np.sum(num)) / d if d > 0 else float("nan")


def resample_counts(rng: np.random.Generator, n_problems: int, n_boot: int, n_strata: int = 1) -> np.ndarray:
    """Bootstrap resamples as counts: out[s, b, p] = how often problem p is drawn in resample b of
    stratum s (P draws with replacement). Returns [n_strata, B, P]; every row sums to P.

    Counts instead of index arrays let every metric be resampled with one matrix product.
    """
    idx = rng.integers(0, n_problems, size=(n_strata * n_boot, n_problems))  # [S*B, P]
    flat = idx + (np.arange(n_strata * n_boot) * n_problems)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_strata * n_boot * n_problems)
    return counts.reshape(n_strata, n_boot, n_problems).astype(np.float64)


def draw_resamples(n_seeds: int, n_problems: int, *, n_boot: int, seed: int,
                   resampling: Resampling = "problems") -> np.ndarray:
    """The resamples for one evaluation set: [1, B, P] shared by all seeds, or [S, B, P] per seed.

    Draw once per set and pass the result to every `interval` / `paired_difference` call on that set:
    then all metrics and all models see the same resampled problems, as a paired comparison needs.
    """
    rng = np.random.default_rng(seed)
    strata = n_seeds if resampling == "seeds_as_strata" else 1
    return resample_counts(rng, n_problems, n_boot, strata)


def resampled_ratios(num: np.ndarray, den: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ratio of sums in every resample: [B].

    num, den: [S, P]. counts: [1, B, P] (one resample of problems for all seeds: the seeds' outcomes
    on a problem travel together) or [S, B, P] (each seed resampled on its own).
    """
    num, den = as_seeds_by_problems(num), as_seeds_by_problems(den)
    if counts.shape[0] == 1:
        n = counts[0] @ num.sum(axis=0)  # [B]
        d = counts[0] @ den.sum(axis=0)  # [B]
    else:
        if counts.shape[0] != num.shape[0]:
            raise ValueError(f"{counts.shape[0]} strata of resamples for {num.shape[0]} seeds")
        n = (counts @ num[:, :, None]).sum(axis=0)[:, 0]  # [S, B, P] @ [S, P, 1] -> [B]
        d = (counts @ den[:, :, None]).sum(axis=0)[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)


def percentile_interval(estimate: float, replicates: np.ndarray, level: float) -> Interval:
    """The percentile interval of bootstrap replicates (Efron & Tibshirani 1993, eq. 13.5); resamples in
    which the metric is undefined (denominator 0) are left out."""
    reps = replicates[~np.isnan(replicates)]
    if np.isnan(estimate) or reps.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), level)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return Interval(float(estimate), float(lo), float(hi), level)


def interval(terms: Terms, counts: np.ndarray, level: float = 0.95) -> Interval:
    """Point estimate and bootstrap interval of one ratio-of-sums metric."""
    num, den = terms
    return percentile_interval(ratio_of_sums(num, den), resampled_ratios(num, den, counts), level)


def paired_difference(a: Terms, b: Terms, counts: np.ndarray, level: float = 0.95) -> Interval:
    """Metric of b minus metric of a on the same problems (and seeds), with a paired bootstrap interval:
    both are evaluated on the same resamples, so what the problems do to both cancels."""
    estimate = ratio_of_sums(*b) - ratio_of_sums(*a)
    replicates = resampled_ratios(*b, counts) - resampled_ratios(*a, counts)
    return percentile_interval(estimate, replicates, level)


def stack_seeds(per_seed: list[Terms]) -> Terms:
    """Per-seed terms ([P] each, the same problems in the same order) -> pooled terms [S, P]."""
    lengths = {len(n) for n, _ in per_seed}
    if len(lengths) != 1:
        raise ValueError(f"seeds were evaluated on different numbers of problems: {sorted(lengths)}")
    return np.stack([np.asarray(n, float) for n, _ in per_seed]), np.stack([np.asarray(d, float) for _, d in per_seed])
