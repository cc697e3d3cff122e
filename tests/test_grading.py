"""Answer extraction and grading by mathematical equivalence (stages/common/grading.py)."""

import random

import math_verify
import pytest

from stages.common.grading import count_distinct, equivalent, extract_answer, grade


@pytest.mark.parametrize(("reply", "expected"), [("42", "42"), ("The answer is 42", "42"), ("", None), ("abc", None)])
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_extract_answer_reads_a_boxed_number_with_thousands_separator():
    answer = extract_answer("\\boxed{3,702}")
    assert answer is not None
    assert equivalent("3702", answer)
    assert not equivalent("3703", answer)


@pytest.mark.parametrize(("gold", "reply", "correct"), [
    ("\\frac{1}{2}", "0.5", True),
    ("3702", "3702.0", True),
    ("7", "007", True),
    ("12", "13", False),
    ("14", "\\boxed{14}", True),
    ("14", "\\frac{24}{2}", False),  # = 12
])
def test_grade_by_mathematical_value(gold, reply, correct):
    graded = grade(gold, reply)
    assert graded.answer is not None
    assert graded.correct is correct


def test_grade_of_a_reply_without_an_answer_is_invalid_and_wrong():
    graded = grade("7", "no idea")
    assert graded.answer is None and graded.correct is False


def _integer_pairs(seed: int = 0, count: int = 50) -> list[tuple[str, str]]:
    """Pairs of integer literals, half of them one value spelled two ways (leading zeros, -0)."""
    rng = random.Random(seed)

    def spell(v: int) -> str:
        # leading zeros only on non-negative values: math-verify cannot parse "-07" (see test_signed_literals_are_read_whole)
        return "0" * rng.randint(1, 3) + str(v) if v >= 0 and rng.random() < 0.5 else str(v)

    pairs = [("0", "-0"), ("-0", "000"), ("00", "0")]
    while len(pairs) < count:
        a = rng.randint(-1000, 1000)
        b = a if rng.random() < 0.5 else rng.choice([-a, a + 1, rng.randint(-1000, 1000)])
        pairs.append((spell(a), spell(b)))
    return pairs


@pytest.mark.parametrize(("a", "b"), _integer_pairs())
def test_integer_fast_path_agrees_with_math_verify(a, b):
    expected = math_verify.verify(math_verify.parse(a), math_verify.parse(b))
    assert equivalent(a, b) is expected


def test_integer_pairs_cover_both_outcomes():
    # guards the test above against a generator that only makes equal (or only different) pairs
    outcomes = [int(a) == int(b) for a, b in _integer_pairs()]
    assert 10 <= sum(outcomes) <= 40


@pytest.mark.parametrize(("a", "b"), [("+7", "7"), ("-007", "-7")])
def test_signed_literals_are_read_whole(a, b):
    # Bare, math-verify cannot read "+7" or "-007"; as a whole math expression ("$+7$") it reads
    # the value, and that is how answers are compared: both pairs are equal.
    assert math_verify.verify(math_verify.parse(f"${a}$"), math_verify.parse(f"${b}$"))
    assert equivalent(a, b)


def test_count_distinct_by_value_ignoring_invalid():
    # {1, 1.0} is one value, {2, 4/2} another, None never counts -> 2
    assert count_distinct(["1", "1.0", None, "2", "4/2"]) == 2


def test_count_distinct_of_nothing_valid_is_zero():
    assert count_distinct([None, None]) == 0


@pytest.mark.parametrize(("gold", "reply"), [("\\sqrt{2}", "\\boxed{\\sqrt{2}}"), ("\\pi", "\\boxed{\\pi}")])
def test_grade_symbolic_answers(gold, reply):
    assert grade(gold, reply).correct


def test_count_distinct_of_repeated_symbolic_answer():
    a = extract_answer("\\boxed{\\sqrt{2}}")
    assert count_distinct([a, a]) == 1
