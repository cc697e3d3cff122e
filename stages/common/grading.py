"""Answer extraction and grading by mathematical equivalence (math-verify), never by raw string.

`grade(gold, reply)` is what RL rewards and evaluation both use, so training and evaluation can never
disagree on what counts as correct. Distinctness for the repetition penalty uses the same equivalence:
`12`, `12.0` and `\\boxed{12}` are one answer.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

import sympy
from math_verify import parse, verify

# Integer literals math-verify reads as integers: digits, or a minus and digits without leading zeros.
_INT = re.compile(r"-?[1-9][0-9]*|[0-9]+")
# math-verify warns once when a timeout is off (worker threads); that is deliberate here.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Graded:
    answer: str | None
    """The extracted final answer (canonical text); None when the reply holds none (invalid)."""
    correct: bool


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=200_000)
def _parse(text: str) -> tuple:
    return tuple(parse(text, fallback_mode="no_fallback", parsing_timeout=_timeout()))


@lru_cache(maxsize=200_000)
def _parse_value(text: str) -> tuple:
    # A reference or extracted answer is LaTeX or a number without delimiters; "$...$" makes
    # math-verify read the whole of it (e.g. "\\frac{1}{2}") rather than search inside it.
    return _parse(f"${text}$") or _parse(text)


def extract_answer(reply: str) -> str | None:
    """The final answer of a model reply, as canonical LaTeX; None if it holds no readable value.

    math-verify does the extraction (the last \\boxed{} first, then LaTeX and plain expressions), so
    "The answer is 42", "\\boxed{42}" and "42" all give "42", and "\\boxed{\\sqrt{2}}" gives "\\sqrt{2}".
    A reply that is a bare integer, the common case on the RL hot path, skips the sympy round trip.
    """
    text = reply.strip()
    if _INT.fullmatch(text):
        return str(int(text))
    parsed = _parse(reply)
    if not parsed:
        return None
    value = parsed[0]
    # LaTeX, not str(): math-verify reads "\\sqrt{2}" back but not sympy's "sqrt(2)".
    return sympy.latex(value) if isinstance(value, sympy.Basic) else str(value)


@lru_cache(maxsize=400_000)
def equivalent(a: str, b: str) -> bool:
    """True when two answers (reference or extracted) have the same mathematical value.

    Two plain integer literals compare as integers, exactly what math-verify concludes, without its
    sympy cost; everything else goes through math-verify's `verify`.
    """
    if _INT.fullmatch(a.strip()) and _INT.fullmatch(b.strip()):
        return int(a) == int(b)
    pa, pb = _parse_value(a), _parse_value(b)
    if not pa or not pb:
        return False
    return bool(verify(list(pa), list(pb), timeout_seconds=_timeout()))


def grade(gold: str, reply: str) -> Graded:
    answer = extract_answer(reply)
    return Graded(answer=answer, correct=answer is not None and equivalent(gold, answer))


def count_distinct(answers: list[str | None]) -> int:
    """E in the repetition penalty: how many mathematically distinct VALID answers the list holds.

    Invalid answers (None) never count as distinct, so emitting garbage cannot buy diversity.
    """
    reps: list[str] = []
    for a in answers:
        if a is not None and not any(equivalent(r, a) for r in reps):
            reps.append(a)
    return len(reps)
