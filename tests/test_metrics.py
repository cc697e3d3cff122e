"""Metrics of stages/common/metrics.py: Pass@k against brute force, the multi-turn metrics by hand."""

from itertools import combinations

import pytest

from stages.common.episodes import Episode, Problem, Turn
from stages.common.metrics import (
    avg_turns,
    effective_answer_ratio,
    episode_metrics,
    invalid_rate,
    pass_at_k,
    succ_at_k,
)

T = 3


# --- pass_at_k ---------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (4, 1, 2), (5, 2, 3), (6, 3, 1), (8, 1, 4),
                                           (8, 3, 5), (8, 6, 3), (8, 0, 8), (7, 2, 6), (8, 8, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k))


def test_pass_at_k_small_case_by_hand():
    # n=4, c=1, k=2: 6 pairs, 3 contain the correct sample -> 1/2
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# --- multi-turn metrics on 4 hand-built episodes with T = 3 -----------------------------------------


def episode(answers: list[str | None], solved_at: int | None) -> Episode:
    turns = [Turn(context_ids=[1], answer_ids=[2, 3], reply="r", answer=a, correct=t == solved_at)
             for t, a in enumerate(answers)]
    return Episode(Problem(id="p", question="q?", answer="7"), turns, done=True)


EPISODES = [
    episode(["7"], solved_at=0),  # 1 turn,  E=1, 0 invalid
    episode(["1", None, "7"], solved_at=2),  # 3 turns, E=2, 1 invalid
    episode(["2", "2", "3"], solved_at=None),  # 3 turns, E=2, 0 invalid (unsolved uses all T)
    episode(["4", "7"], solved_at=1),  # 2 turns, E=2, 0 invalid
]


def test_succ_at_k():
    # solved turns: 0, 2, never, 1
    assert succ_at_k(EPISODES, 1) == pytest.approx(1 / 4)  # turn 0 only
    assert succ_at_k(EPISODES, 2) == pytest.approx(2 / 4)  # turns 0, 1
    assert succ_at_k(EPISODES, 3) == pytest.approx(3 / 4)  # turns 0, 1, 2


def test_succ_at_k_is_non_decreasing():
    values = [succ_at_k(EPISODES, k) for k in range(0, T + 1)]
    assert values == sorted(values)
    assert values[0] == 0.0


def test_avg_turns_and_its_identity_with_succ_at_k():
    # (1 + 3 + 3 + 2) / 4 = 9/4
    assert avg_turns(EPISODES) == pytest.approx(2.25)
    # 1 + (1 - 1/4) + (1 - 2/4) = 1 + 0.75 + 0.5 = 2.25
    identity = 1 + sum(1 - succ_at_k(EPISODES, k) for k in range(1, T))
    assert avg_turns(EPISODES) == pytest.approx(identity)


def test_effective_answer_ratio():
    # mean of E/T: (1/1 + 2/3 + 2/3 + 2/2) / 4 = (10/3) / 4 = 5/6
    assert effective_answer_ratio(EPISODES) == pytest.approx(5 / 6)


def test_invalid_rate():
    # 1 None among 1 + 3 + 3 + 2 = 9 answers
    assert invalid_rate(EPISODES) == pytest.approx(1 / 9)


def test_episode_metrics_collects_all_of_them():
    out = episode_metrics(EPISODES, max_turns=T)
    assert out == pytest.approx({"succ_at_1": 0.25, "succ_at_2": 0.5, "succ_at_3": 0.75, "avg_turns": 2.25,
                                 "effective_answer_ratio": 5 / 6, "invalid_rate": 1 / 9})
