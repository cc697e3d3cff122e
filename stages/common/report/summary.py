"""Results with bootstrap intervals and paired comparisons, for any list of (model or arm, eval set):
`summarise_set` from per-problem terms, `arms_from_examples` to rebuild (and pool over seeds) the terms
from the evaluate stage's examples table, and what the report shows in which order and colour
(`metric_order`, `verdict`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stages.common.metrics import EpisodeOutcomes, greedy_terms, multi_turn_terms, pass_at_k_terms
from stages.common.stats import (
    Interval,
    Resampling,
    Terms,
    draw_resamples,
    interval,
    paired_difference,
    stack_seeds,
)

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Arm:
    """One model (or ablation arm) under one inference condition, as per-problem metric terms.

    terms: metric name -> (num, den), arrays [P] or [S, P] (seeds x problems), the same problems in the
    same order for every arm of a set.
    """

    model: str
    feedback: bool
    terms: dict[str, Terms]

    @property
    def label(self) -> str:
        return label(self.model, self.feedback)


def label(model: str, feedback: bool) -> str:
    """`rl` for the model evaluated with feedback at inference, `rl_no_feedback` without."""
    return model if feedback else f"{model}_no_feedback"


@dataclass(frozen=True)
class Result:
    """Every metric of one arm on one eval set, each with its interval."""

    set: str
    model: str
    feedback: bool
    problems: int
    seeds: int
    metrics: dict[str, Interval]

    @property
    def label(self) -> str:
        return label(self.model, self.feedback)


@dataclass(frozen=True)
class Comparison:
    """Paired differences b - a on the same problems (and seeds) of one eval set."""

    set: str
    a: str
    b: str
    metrics: dict[str, Interval]

    @property
    def label(self) -> str:
        return f"{self.b}_vs_{self.a}"


def summarise_set(set_name: str, arms: Sequence[Arm], pairs: Iterable[tuple[str, str]], *, n_boot: int = 2000,
                  level: float = 0.95, seed: int = 0,
                  resampling: Resampling = "problems") -> tuple[list[Result], list[Comparison]]:
    """Intervals for every metric of every arm, and paired differences for each (a, b) label pair.

    One set of resamples serves every arm and metric of the set, so the paired differences are paired.
    """
    shapes = {np.shape(np.atleast_2d(num)) for arm in arms for num, _ in arm.terms.values()}
    if len(shapes) != 1:
        raise ValueError(f"set {set_name!r}: arms were evaluated on different problems/seeds: {sorted(shapes)}")
    n_seeds, n_problems = shapes.pop()
    counts = draw_resamples(n_seeds, n_problems, n_boot=n_boot, seed=seed, resampling=resampling)
    results = [Result(set_name, arm.model, arm.feedback, n_problems, n_seeds,
                      {m: interval(t, counts, level) for m, t in arm.terms.items()}) for arm in arms]
    by_label = {arm.label: arm for arm in arms}
    comparisons = []
    for a, b in pairs:
        if a not in by_label or b not in by_label:
            raise ValueError(f"set {set_name!r}: no arm {a if a not in by_label else b!r} to compare; "
                             f"arms are {sorted(by_label)}")
        shared = [m for m in by_label[b].terms if m in by_label[a].terms]
        comparisons.append(Comparison(set_name, a, b, {
            m: paired_difference(by_label[a].terms[m], by_label[b].terms[m], counts, level) for m in shared}))
    return results, comparisons


def arms_from_examples(per_seed: Sequence[pd.DataFrame], set_name: str, max_turns: int) -> list[Arm]:
    """The arms of one eval set rebuilt from the evaluate stage's `examples` parquet (one row per episode),
    one frame per seed: pooled terms [S, P], problems sorted by id (every seed must hold the same ones).

    This is how runs are pooled: evaluate each seed's models, then
    `summarise_set(set, arms_from_examples([seed0, seed1, seed2], set, T), pairs)`.
    """
    frames = [df[df.set == set_name] for df in per_seed]
    if not len(frames[0]):
        raise ValueError(f"no examples of set {set_name!r}")
    keys = list(dict.fromkeys(zip(frames[0].model, frames[0].feedback, strict=True)))
    arms = []
    for model, shown in keys:
        single_turn_here = shown or (model, True) not in keys  # single-turn metrics do not depend on feedback
        per_seed_terms = []
        ids0 = None
        for i, df in enumerate(frames):
            d = df[(df.model == model) & (df.feedback == shown)].sort_values(["id", "episode"])
            ids = d.id.unique()
            if ids0 is None:
                ids0 = ids
            elif not np.array_equal(ids, ids0):
                raise ValueError(f"set {set_name!r}, {label(model, shown)}: seed {i} holds other problems than seed 0")
            g = int(d.episode.max()) + 1

            def col(c, d=d, g=g):
                return d[c].to_numpy(dtype=np.int64).reshape(-1, g)

            terms = multi_turn_terms(EpisodeOutcomes(col("solved_turn"), col("num_turns"), col("num_valid"),
                                                     col("num_distinct")), max_turns)
            if single_turn_here:
                first = d[d.episode == 0]
                terms |= pass_at_k_terms(first.single_correct.to_numpy(), int(first.num_samples.iloc[0]), max_turns)
                terms |= greedy_terms(first.greedy_correct.to_numpy())
            per_seed_terms.append(terms)
        arms.append(Arm(model, bool(shown), {m: stack_seeds([t[m] for t in per_seed_terms])
                                             for m in per_seed_terms[0]}))
    return arms


def metric_order(max_turns: int) -> list[tuple[str, str]]:
    """(metric name, display name) in the report's order."""
    ks = range(1, max_turns + 1)
    return ([(f"succ_at_{k}", f"Succ@{k}") for k in ks] + [("succ_auc", "Succ@k area")]
            + [(f"pass_at_{k}", f"Pass@{k}") for k in ks] + [("greedy_accuracy", "Greedy accuracy")]
            + [("avg_turns", "Average turns"), ("avg_turns_to_success", "Turns to success (solved)"),
               ("effective_answer_ratio", "Effective answer ratio"), ("repeat_share", "Repeat share (failed)"),
               ("all_same_share", "All-same share (failed)")]
            + [(f"self_correction_at_{k}", f"Self-correction @{k} | wrong @{k - 1}") for k in ks if k >= 2]
            + [("retry_success", "Retry success | wrong @1"), ("invalid_rate", "Invalid rate")])


#: Metrics in the paired-difference plot (all are shares, so one axis fits them).
FOREST = ("succ_at_1", "succ_at_{T}", "succ_auc", "pass_at_{T}", "effective_answer_ratio", "repeat_share",
          "self_correction_at_2", "retry_success", "invalid_rate")


#: Metrics where a lower value is the better one (for colouring differences).
LOWER_IS_BETTER = ("avg_turns", "avg_turns_to_success", "invalid_rate", "repeat_share", "all_same_share")


def verdict(name: str, iv: Interval) -> str:
    """`better` / `worse` when the interval of a difference b - a excludes 0 (b better / worse than a on
    metric `name`), else `unclear`."""
    if not iv.excludes(0.0):
        return "unclear"
    return "better" if (iv.lo > 0) != (name in LOWER_IS_BETTER) else "worse"


def set_names(results: Iterable[Result]) -> list[str]:
    return list(dict.fromkeys(r.set for r in results))


def level_text(items) -> str:
    first = next(iter(next(iter(items)).metrics.values()))
    return f"{first.level:.0%}"
