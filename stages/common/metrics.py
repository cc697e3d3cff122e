"""Multi-turn and single-turn evaluation metrics, each a ratio of per-problem sums.

Every metric here is `sum over problems of num / sum over problems of den`, with (num, den) per problem
(`Terms`): that one form gives the point estimate, pools seeds and episodes, and lets
`stages/common/stats.py` bootstrap every metric by resampling problems. Shared by RL's rollout logging
(`episode_metrics`) and the evaluate stage.

Multi-turn episodes follow the UFO protocol (question -> answer -> "Let's try again." -> ..., at most T
turns, stop at the first correct answer). Turn numbers in metric NAMES are 1-based (Succ@1 is the first
answer); `solved_turn` values are 0-based, as in `Episode.solved_turn`.

Metric names (k = 1..T unless said):
- succ_at_{k}: share of episodes solved within their first k turns (the paper's Succ@k).
- succ_auc: normalised area under the Succ@k curve, mean over k = 1..T of Succ@k; an episode solved at
  1-based turn t scores (T - t + 1) / T, so earlier solves count more.
- pass_at_{k}: unbiased Pass@k from n independent single-turn samples per problem (Chen et al. 2021).
- greedy_accuracy: share of problems the greedy (temperature 0) single-turn answer solves.
- avg_turns: answers given per episode; a failed episode uses all T.
- avg_turns_to_success: 1-based turn of the correct answer, among solved episodes only.
- effective_answer_ratio: mean over episodes of E / (answers given), E = distinct valid answers.
- invalid_rate: share of all answers given that held no readable value.
- repeat_share: among failed episodes, the share in which a post-feedback answer equals (math-verify
  equivalence) an earlier valid answer of the same episode.
- all_same_share: among failed episodes, the share whose T answers are one and the same valid answer
  (the paper's "identical answers across 5 rounds in ~70% of single-turn RL failures").
- self_correction_at_{k} (k = 2..T): P(solved at turn k | wrong at turn k-1), among episodes still
  unsolved after k-1 turns (the paper's Succ@2|fail@1 for k = 2).
- retry_success: P(solved at some turn 2..T | wrong at turn 1) = (Succ@T - Succ@1) / (1 - Succ@1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import comb
from typing import TYPE_CHECKING

import numpy as np

from stages.common.stats import Terms, ratio_of_sums

if TYPE_CHECKING:  # metrics stay importable without torch (flows and reports use them)
    from stages.common.episodes import Episode


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021, Codex, eq. 1):
    1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass(frozen=True)
class EpisodeOutcomes:
    """What the multi-turn metrics need from episodes: integer arrays [P, G], G episodes per problem.

    solved_turn: 0-based turn of the correct answer, -1 when never solved.
    num_turns: answers given (T for a failed episode).
    num_valid: answers that held a readable value.
    num_distinct: mathematically distinct valid answers (E of the repetition penalty).
    """

    solved_turn: np.ndarray
    num_turns: np.ndarray
    num_valid: np.ndarray
    num_distinct: np.ndarray

    @classmethod
    def from_episodes(cls, episodes: list[Episode], group_size: int = 1) -> EpisodeOutcomes:
        """Episodes grouped by problem, as `rollout` returns them: episodes[p * group_size + g]."""
        if len(episodes) % group_size:
            raise ValueError(f"{len(episodes)} episodes do not split into groups of {group_size}")

        def arr(values: list[int]) -> np.ndarray:
            return np.asarray(values, dtype=np.int64).reshape(-1, group_size)

        return cls(
            solved_turn=arr([-1 if e.solved_turn is None else e.solved_turn for e in episodes]),
            num_turns=arr([e.num_turns for e in episodes]),
            num_valid=arr([e.num_turns - e.num_invalid for e in episodes]),
            num_distinct=arr([e.num_distinct for e in episodes]),
        )


def multi_turn_terms(o: EpisodeOutcomes, max_turns: int) -> dict[str, Terms]:
    """Per-problem (num, den) of every multi-turn metric (module docstring), summed over the G episodes
    of each problem: arrays [P]."""
    s = o.solved_turn  # [P, G]
    solved = s >= 0
    failed = ~solved
    ones = np.ones_like(s, dtype=np.float64)

    def terms(num, den=ones) -> Terms:
        return np.asarray(num, dtype=np.float64).sum(axis=1), np.asarray(den, dtype=np.float64).sum(axis=1)

    out = {f"succ_at_{k}": terms(solved & (s < k)) for k in range(1, max_turns + 1)}
    out["succ_auc"] = terms(np.where(solved, (max_turns - s) / max_turns, 0.0))
    out["avg_turns"] = terms(o.num_turns)
    out["avg_turns_to_success"] = terms(np.where(solved, s + 1, 0), solved)
    out["effective_answer_ratio"] = terms(o.num_distinct / o.num_turns)
    out["invalid_rate"] = terms(o.num_turns - o.num_valid, o.num_turns)
    out["repeat_share"] = terms(failed & (o.num_distinct < o.num_valid), failed)
    out["all_same_share"] = terms(failed & (o.num_distinct == 1) & (o.num_valid == o.num_turns), failed)
    for k in range(2, max_turns + 1):  # wrong at turn k-1 <=> not solved within k-1 turns
        out[f"self_correction_at_{k}"] = terms(s == k - 1, failed | (s >= k - 1))
    out["retry_success"] = terms(s >= 1, s != 0)
    return out


def pass_at_k_terms(correct: np.ndarray, num_samples: int, max_k: int) -> dict[str, Terms]:
    """Per-problem unbiased Pass@k (k = 1..max_k) from `correct[p]` correct out of `num_samples`."""
    ones = np.ones(len(correct))
    return {f"pass_at_{k}": (np.array([pass_at_k(num_samples, int(c), k) for c in correct]), ones)
            for k in range(1, max_k + 1)}


def greedy_terms(correct: np.ndarray) -> dict[str, Terms]:
    """Per-problem greedy accuracy terms from a [P] array of 0/1."""
    return {"greedy_accuracy": (np.asarray(correct, dtype=np.float64), np.ones(len(correct)))}


def describe(name: str) -> str:
    """One line saying what metric `name` measures (for reports and run descriptions)."""
    if m := re.fullmatch(r"succ_at_(\d+)", name):
        return f"share of episodes solved within their first {m[1]} turns (Succ@{m[1]})"
    if m := re.fullmatch(r"pass_at_(\d+)", name):
        return f"unbiased Pass@{m[1]}: P(at least one of {m[1]} independent single-turn samples is correct)"
    if m := re.fullmatch(r"self_correction_at_(\d+)", name):
        k = int(m[1])
        return f"P(solved at turn {k} | wrong at turn {k - 1}), among episodes unsolved after {k - 1} turns"
    return _DESCRIPTIONS.get(name, name)


_DESCRIPTIONS = {
    "succ_auc": "area under the Succ@k curve, mean of Succ@1..T (earlier solves count more)",
    "greedy_accuracy": "share of problems the greedy (temperature 0) single-turn answer solves",
    "avg_turns": "answers given per episode; a failed episode uses all T",
    "avg_turns_to_success": "turn of the correct answer, among solved episodes only",
    "effective_answer_ratio": "mean over episodes of distinct valid answers / answers given",
    "invalid_rate": "share of all answers that held no readable value",
    "repeat_share": "failed episodes in which a post-feedback answer repeats an earlier valid one",
    "all_same_share": "failed episodes whose T answers are all the same valid answer",
    "retry_success": "P(solved at some later turn | wrong at turn 1)",
}


def metric_values(terms: dict[str, Terms]) -> dict[str, float]:
    """Point estimates (ratio of sums) of every metric; nan where undefined."""
    return {name: ratio_of_sums(num, den) for name, (num, den) in terms.items()}


# --- episode-level views (RL's rollout logging, hand-counted tests) ----------------------------------


def _one(episodes: list[Episode], name: str, max_turns: int) -> float:
    return ratio_of_sums(*multi_turn_terms(EpisodeOutcomes.from_episodes(episodes), max_turns)[name])


def succ_at_k(episodes: list[Episode], k: int) -> float:
    """Share of episodes solved within their first k turns."""
    return sum(e.solved_turn is not None and e.solved_turn < k for e in episodes) / len(episodes)


def avg_turns(episodes: list[Episode]) -> float:
    """Turns used per episode (a failure uses all it was given): equals 1 + sum_{k<T} (1 - Succ@k)."""
    return sum(e.num_turns for e in episodes) / len(episodes)


def effective_answer_ratio(episodes: list[Episode]) -> float:
    """Mean over episodes of E/T: distinct valid answers over answers given (1.0 = never repeats)."""
    return sum(e.num_distinct / e.num_turns for e in episodes) / len(episodes)


def invalid_rate(episodes: list[Episode]) -> float:
    """Share of all answers given that held no readable value."""
    return sum(e.num_invalid for e in episodes) / sum(e.num_turns for e in episodes)


def repeat_share(episodes: list[Episode], max_turns: int) -> float:
    """Among failed episodes, the share that repeat an earlier valid answer after feedback; nan if none failed."""
    return _one(episodes, "repeat_share", max_turns)


def self_correction(episodes: list[Episode], k: int, max_turns: int) -> float:
    """P(solved at 1-based turn k | wrong at turn k-1), k >= 2; nan if no episode was wrong at k-1."""
    return _one(episodes, f"self_correction_at_{k}", max_turns)


def episode_metrics(episodes: list[Episode], max_turns: int) -> dict[str, float]:
    """Succ@k, average turns, effective answer ratio and invalid rate of a batch of episodes (RL logs these
    every step)."""
    out = {f"succ_at_{k}": succ_at_k(episodes, k) for k in range(1, max_turns + 1)}
    out["avg_turns"] = avg_turns(episodes)
    out["effective_answer_ratio"] = effective_answer_ratio(episodes)
    out["invalid_rate"] = invalid_rate(episodes)
    return out
