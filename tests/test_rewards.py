"""UFO rewards (stages/rl/rewards.py) on hand-built episodes, against hand-computed returns."""

import pytest

from stages.common.episodes import Episode, Problem, Turn
from stages.rl.rewards import episode_return, repetition_penalty, success_reward

GAMMA, LAM = 0.5, 0.5


def episode(gold: str, answers: list[str | None], solved_at: int | None) -> Episode:
    """An episode whose turn t gave answers[t]; only turn `solved_at` (if any) is marked correct."""
    problem = Problem(id="p", question="q?", answer=gold)
    turns = [Turn(context_ids=[1, 2], answer_ids=[3, 4, 5], reply=f"reply {t}", answer=a, correct=t == solved_at)
             for t, a in enumerate(answers)]
    return Episode(problem, turns, done=True)


def ret(ep: Episode) -> float:
    return episode_return(ep.solved_turn, ep.num_distinct, ep.num_turns, GAMMA, LAM)


@pytest.mark.parametrize(("turn", "expected"), [(0, 1.0), (1, 0.5), (2, 0.25), (3, 0.125), (4, 0.0625)])
def test_success_reward_decays_with_the_turn(turn, expected):
    # 0.5**t: 1, 1/2, 1/4, 1/8, 1/16
    assert success_reward(turn, GAMMA) == pytest.approx(expected)


def test_unsolved_episode_gets_no_success_reward():
    assert success_reward(None, GAMMA) == 0.0


def test_repetition_penalty():
    assert repetition_penalty(3, 5, LAM) == pytest.approx(0.2)  # 0.5 * (1 - 3/5) = 0.5 * 0.4
    assert repetition_penalty(5, 5, LAM) == 0.0  # never repeated: 0.5 * (1 - 1)
    assert repetition_penalty(0, 4, LAM) == pytest.approx(0.5)  # nothing valid: 0.5 * (1 - 0)
    with pytest.raises(ValueError):
        repetition_penalty(0, 0, LAM)


def test_return_of_episode_with_repeats_by_value():
    ep = episode("14", ["12", "12.0", "\\frac{24}{2}", "13", "14"], solved_at=4)
    # 12, 12.0 and 24/2 are one value -> distinct {12, 13, 14}: E = 3 of T = 5
    assert (ep.solved_turn, ep.num_distinct, ep.num_turns) == (4, 3, 5)
    # 0.5**4 - 0.5*(1 - 3/5) = 0.0625 - 0.2 = -0.1375
    assert ret(ep) == pytest.approx(-0.1375)


def test_invalid_answers_never_count_as_distinct():
    ep = episode("6", ["5", None, None, "5", "6"], solved_at=4)
    # valid values {5, 6}: E = 2 of T = 5 (the two None add nothing)
    assert (ep.solved_turn, ep.num_distinct, ep.num_turns, ep.num_invalid) == (4, 2, 5, 2)
    # 0.0625 - 0.5*(1 - 2/5) = 0.0625 - 0.3 = -0.2375
    assert ret(ep) == pytest.approx(-0.2375)

    garbage = episode("1", [None, None, None], solved_at=None)
    # E = 0 of T = 3, unsolved: 0 - 0.5*(1 - 0) = -0.5
    assert garbage.num_distinct == 0
    assert ret(garbage) == pytest.approx(-0.5)


def test_first_turn_success_and_all_distinct_failure():
    assert ret(episode("3", ["3"], solved_at=0)) == pytest.approx(1.0)  # 0.5**0 - 0.5*(1 - 1/1)
    # unsolved, 5 different values: 0 - 0.5*(1 - 5/5) = 0
    assert ret(episode("9", ["1", "2", "3", "4", "5"], solved_at=None)) == 0.0


def test_the_stage_returns_with_the_plausible_only_penalty():
    from stages.rl import Config
    from stages.rl.stage import episode_returns

    # One problem, group of 2. Firsts: "5" and "7". Episode 1 invents "8", "9" after the feedback.
    eps = [episode("6", ["5", "8", "9"], solved_at=None), episode("6", ["7", "5", "6"], solved_at=2)]
    plain = episode_returns(eps, Config(group_size=2, minibatch_size=64))
    plausible = episode_returns(eps, Config(group_size=2, minibatch_size=64, repetition_count="plausible"))
    # distinct: ep1 E=3 of T=3 -> 0; ep2 0.25 - 0 -> 0.25
    assert plain.tolist() == pytest.approx([0.0, 0.25])
    # plausible: ep1 E=1 ("5") of 3 -> -0.5*(2/3); ep2 E=2 ("7", "5"; "6" was no group's first) -> 0.25 - 0.5/3
    assert plausible.tolist() == pytest.approx([-1 / 3, 0.25 - 1 / 6])
