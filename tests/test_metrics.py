"""Metrics of stages/common/metrics.py: Pass@k against brute force; the multi-turn metrics, the repeat share
and conditional self-correction against hand-counted episodes."""

from itertools import combinations

import numpy as np
import pytest

from stages.common.episodes import Episode, Problem, Turn
from stages.common.metrics import (
    EpisodeOutcomes,
    avg_turns,
    effective_answer_ratio,
    episode_metrics,
    greedy_terms,
    invalid_rate,
    metric_values,
    multi_turn_terms,
    pass_at_k,
    pass_at_k_terms,
    repeat_share,
    self_correction,
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


# --- the evaluation metrics as per-problem terms, on hand-counted episodes (T = 3) ---------------------

FAILURES_AND_RETRIES = [
    episode(["5", "5", "5"], solved_at=None),  # failed; repeats after feedback; all three answers the same
    episode(["5", None, "6"], solved_at=None),  # failed; 5 and 6 differ, the invalid one repeats nothing
    episode([None, None, None], solved_at=None),  # failed; no valid answer, so nothing repeated
    episode(["5", "6", "5.0"], solved_at=None),  # failed; "5.0" is 5 again (math-verify equivalence)
    episode(["3", "3", "7"], solved_at=2),  # repeats, but solved: not in the repeat share
    episode(["7"], solved_at=0),
    episode(["4", "7"], solved_at=1),
]


def test_repeat_share_by_hand():
    # failed: 4 episodes; of them the 1st and the 4th repeat an earlier valid answer -> 2/4
    assert repeat_share(FAILURES_AND_RETRIES, T) == pytest.approx(0.5)


def test_all_same_share_by_hand():
    # of the 4 failed episodes only the 1st gave one and the same valid answer 3 times -> 1/4
    values = metric_values(multi_turn_terms(EpisodeOutcomes.from_episodes(FAILURES_AND_RETRIES), T))
    assert values["all_same_share"] == pytest.approx(0.25)


def test_conditional_self_correction_by_hand():
    # wrong at turn 1: every episode but ["7"] -> 6; solved at turn 2: ["4", "7"] -> 1/6
    assert self_correction(FAILURES_AND_RETRIES, 2, T) == pytest.approx(1 / 6)
    # wrong at turn 2 (unsolved after 2 turns): the 4 failures and ["3", "3", "7"] -> 5; solved at turn 3: 1 -> 1/5
    assert self_correction(FAILURES_AND_RETRIES, 3, T) == pytest.approx(1 / 5)


def test_self_correction_is_undefined_when_nobody_was_wrong():
    assert np.isnan(self_correction([episode(["7"], solved_at=0)], 2, T))
    assert np.isnan(repeat_share([episode(["7"], solved_at=0)], T))


def test_the_other_evaluation_metrics_by_hand():
    v = metric_values(multi_turn_terms(EpisodeOutcomes.from_episodes(FAILURES_AND_RETRIES), T))
    # solved at 1-based turns 3, 1, 2 (3 of 7 episodes)
    assert v["succ_at_1"] == pytest.approx(1 / 7) and v["succ_at_3"] == pytest.approx(3 / 7)
    assert v["avg_turns_to_success"] == pytest.approx((3 + 1 + 2) / 3)
    assert v["retry_success"] == pytest.approx(2 / 6)  # wrong at turn 1: 6; solved later: 2
    # area: (T - t + 1) / T per solved episode = 1/3 + 3/3 + 2/3 = 2, over 7 episodes; = mean of Succ@1..3
    assert v["succ_auc"] == pytest.approx(2 / 7)
    assert v["succ_auc"] == pytest.approx(np.mean([v[f"succ_at_{k}"] for k in (1, 2, 3)]))
    assert v["invalid_rate"] == pytest.approx(4 / 18)  # 4 None among 3+3+3+3+3+1+2 = 18 answers
    assert v["avg_turns"] == pytest.approx(18 / 7)
    # E / turns: 1/3, 2/3, 0/3, 2/3, 2/3, 1/1, 2/2 -> (7/3 + 2) / 7
    assert v["effective_answer_ratio"] == pytest.approx(13 / 21)


def test_terms_agree_with_the_episode_level_metrics_rl_logs():
    v = metric_values(multi_turn_terms(EpisodeOutcomes.from_episodes(EPISODES), T))
    assert {k: v[k] for k in episode_metrics(EPISODES, T)} == pytest.approx(episode_metrics(EPISODES, T))


def test_episodes_of_a_problem_are_summed_into_its_terms():
    # two episodes per problem: problem 0 = (solved at turn 1, failed), problem 1 = (solved at 2, solved at 1)
    eps = [episode(["7"], 0), episode(["1", "2", "3"], None), episode(["4", "7"], 1), episode(["7"], 0)]
    o = EpisodeOutcomes.from_episodes(eps, group_size=2)
    assert o.solved_turn.tolist() == [[0, -1], [1, 0]]
    terms = multi_turn_terms(o, T)
    num, den = terms["succ_at_1"]
    assert num.tolist() == [1, 1] and den.tolist() == [2, 2]
    num, den = terms["self_correction_at_2"]  # wrong at turn 1: the failure and the turn-2 solve
    assert num.tolist() == [0, 1] and den.tolist() == [1, 1]
    with pytest.raises(ValueError, match="groups of 3"):
        EpisodeOutcomes.from_episodes(eps, group_size=3)


def test_pass_at_k_and_greedy_terms_are_per_problem():
    terms = pass_at_k_terms(np.array([0, 1, 4]), num_samples=4, max_k=2)
    assert terms["pass_at_1"][0].tolist() == pytest.approx([0, 0.25, 1])
    assert terms["pass_at_2"][0].tolist() == pytest.approx([0, 0.5, 1])  # 1 - C(3,2)/C(4,2) = 1/2
    assert metric_values(terms)["pass_at_2"] == pytest.approx(0.5)
    assert metric_values(greedy_terms(np.array([1, 0, 0, 1])))["greedy_accuracy"] == 0.5
