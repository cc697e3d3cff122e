"""Multi-turn and single-turn metrics: Succ@k, Pass@k, average turns, effective answer ratio, invalid
rate. Shared by RL's rollout logging and the evaluate stage."""

from __future__ import annotations

from math import comb

from stages.common.episodes import Episode


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021, Codex, eq. 1):
    1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


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


def episode_metrics(episodes: list[Episode], max_turns: int) -> dict[str, float]:
    out = {f"succ_at_{k}": succ_at_k(episodes, k) for k in range(1, max_turns + 1)}
    out["avg_turns"] = avg_turns(episodes)
    out["effective_answer_ratio"] = effective_answer_ratio(episodes)
    out["invalid_rate"] = invalid_rate(episodes)
    return out
