"""UFO rewards (arXiv 2507.14295, §3): success decays with the turn it took, and repeating an answer
after being told it was wrong costs a penalty at the end of the episode."""

from __future__ import annotations


def success_reward(solved_turn: int | None, gamma: float) -> float:
    """gamma**t for a correct answer at 0-based turn t; 0 when the episode was never solved."""
    return 0.0 if solved_turn is None else gamma**solved_turn


def repetition_penalty(num_distinct: int, num_answers: int, lam: float) -> float:
    """lam * (1 - E/T): E distinct (by mathematical value) valid answers among the T answers given."""
    if num_answers <= 0:
        raise ValueError("an episode has at least one answer")
    return lam * (1.0 - num_distinct / num_answers)


def episode_return(solved_turn: int | None, num_distinct: int, num_answers: int, gamma: float, lam: float) -> float:
    """The scalar return of one episode: success_reward - repetition_penalty."""
    return success_reward(solved_turn, gamma) - repetition_penalty(num_distinct, num_answers, lam)
