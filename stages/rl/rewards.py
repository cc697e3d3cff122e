"""UFO rewards (arXiv 2507.14295, §3): success decays with the turn it took, and repeating an answer
after being told it was wrong costs a penalty at the end of the episode."""

from __future__ import annotations

from stages.common.grading import count_distinct, equivalent


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


def plausible_distinct(answers: list[str | None], plausible: list[str]) -> int:
    """E of the plausible-only penalty: distinct valid answers of one episode that equal (math-verify)
    one of `plausible`, the answers the policy gives unprompted to this problem. Another wrong number
    invented after the feedback earns nothing; an answer the policy itself finds likely does.

    A variant of the paper's E (§3.2), tried because at tiny scale UFO met the plain penalty by giving
    other wrong numbers (shared/research/arms-calibration.md).
    """
    return count_distinct([a for a in answers if a is not None and any(equivalent(a, p) for p in plausible)])


def group_plausible_distinct(answers: list[list[str | None]], group_size: int) -> list[int]:
    """plausible_distinct of every episode, the plausible answers of a group being the valid FIRST answers
    of its group_size episodes (one problem's samples): answers[p * group_size + g] -> [P*G] counts."""
    if len(answers) % group_size:
        raise ValueError(f"{len(answers)} episodes do not split into groups of {group_size}")
    counts = []
    for start in range(0, len(answers), group_size):
        group = answers[start:start + group_size]
        firsts = [ep[0] for ep in group if ep and ep[0] is not None]
        counts += [plausible_distinct(ep, firsts) for ep in group]
    return counts
