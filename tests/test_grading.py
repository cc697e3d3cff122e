"""Answer extraction and grading by mathematical equivalence (stages/common/grading.py)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import math_verify
import pytest

from stages.common import grading
from stages.common.grading import Graded, count_distinct, equivalent, extract_answer, grade, reference_answer
from tests.helpers import REPO, SHARED_DATA


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


# --- issue 9, point 3: grading that holds up --------------------------------------------------------

CASES_FILE = Path(__file__).parent / "data" / "grading_cases.jsonl"
CASES = [json.loads(line) for line in CASES_FILE.read_text().splitlines() if line.strip()]


def test_the_tricky_pairs_cover_every_kind_in_issue_9():
    kinds = {c["kind"] for c in CASES}
    assert kinds >= {"latex-whole", "text", "hedge", "guesses", "list", "fraction-decimal", "thousands", "units",
                     "degrees", "tuple", "interval"}
    for kind in kinds:  # each kind holds both verdicts, so a grader that always says one thing fails it
        assert {c["expected"] for c in CASES if c["kind"] == kind} == {True, False} or kind == "guesses", kind


@pytest.mark.parametrize("case", CASES, ids=[f"{c['kind']}:{c['gold']}|{c['reply']}" for c in CASES])
def test_tricky_pair(case):
    assert grade(case["gold"], case["reply"]).correct is case["expected"], case.get("note", "")


@pytest.mark.parametrize(("reply", "answer", "equals", "differs"), [
    ("\\sqrt 5", "\\sqrt 5", "\\sqrt{5}", "5"),
    ("(0, 4]", "(0, 4]", "(0,4]", "4"),
    ("(2, \\frac{\\pi}{3})", "(2, \\frac{\\pi}{3})", "\\left(2, \\frac{\\pi}{3}\\right)", "2"),
    ("\\frac{1}{3}\\sqrt{7}", "\\frac{1}{3}\\sqrt{7}", "\\frac{\\sqrt{7}}{3}", "\\frac{1}{3}"),
    ("The answer is $\\sqrt 5$.", "\\sqrt 5", "\\sqrt{5}", "5"),
    ("1,000,000", "1000000", "10^6", "1"),
    ("10, 11, 12", "10, 11, 12", "\\{10, 11, 12\\}", "12"),
])
def test_a_reply_that_is_only_latex_is_read_whole(reply, answer, equals, differs):
    assert extract_answer(reply) == answer
    assert equivalent(equals, answer)
    assert not equivalent(differs, answer)


@pytest.mark.parametrize("reply", ["10 or 11", "\\boxed{10} or \\boxed{11}", "10 \\text{ or } 11", "Is it 10?",
                                   "The answer is 10 or 11.", "10 (or 11)", "probably 10, maybe 11", "\\frac{1}{2", ""])
def test_a_hedge_or_an_unreadable_reply_is_invalid(reply):
    # invalid, not merely wrong: it never counts as a distinct answer in the repetition penalty
    assert extract_answer(reply) is None
    assert grade("10", reply) == Graded(answer=None, correct=False)


def test_one_value_stated_twice_is_not_a_hedge():
    # MATH500's own solution to one problem ends like this; both forms are 639/40
    reply = "$d = 15\\frac{975}{1000} = \\boxed{15\\frac{39}{40}},$ or $\\boxed{\\frac{639}{40}}$ inches."
    assert grade("\\frac{639}{40}", reply) == Graded(answer="\\frac{639}{40}", correct=True)


def test_text_answers_are_text_only_when_the_gold_is_text():
    assert grade("\\text{Evelyn}", "The answer is Evelyn.") == Graded(answer="\\text{evelyn}", correct=True)
    # a word is no value for a numeric gold, so naming words cannot buy distinct answers
    assert grade("7", "Evelyn") == Graded(answer=None, correct=False)
    # text compares as text, not as a product of one-letter symbols (e*v*e*l*y*n == n*e*v*e*l*y)
    assert not equivalent("\\text{Evelyn}", "\\text{Nevely}")
    assert equivalent("\\text{(C)}", "\\text{c}")


@pytest.mark.parametrize(("gold", "read"), [("2,125", "2125"), ("(3,4]", "(3,4]"), ("\\text{(C)}", "\\text{c}"),
                                           ("5.4 \\text{ cents}", "5.4 \\text{ cents}"), ("\\text{Evelyn}", "\\text{evelyn}"),
                                           ("\\frac{1}{0}", None), ("\\frac{1}{", None), ("", None)])
def test_reference_answer_reads_golds_whole_and_refuses_what_no_reply_could_match(gold, read):
    assert reference_answer(gold) == read


def test_count_distinct_reads_answers_whole_and_text_as_text():
    assert count_distinct(["(0, 4]", "(0,4]", "4"]) == 2
    assert count_distinct(["\\sqrt 5", "5", "\\sqrt{5}"]) == 2
    assert count_distinct(["\\text{evelyn}", "\\text{Evelyn}", "\\text{navin}", None]) == 2


@pytest.mark.parametrize("reply", ["}{", "\\frac{", "$$$$", "\\boxed{\\boxed{", "\\left(", "x" * 20_000,
                                   "\\begin{pmatrix}", "∞ ≠ ∅", "\x00", "1/0", "\\frac{1}{0}"])
def test_grading_never_raises(reply):
    graded = grade("1", reply)
    assert graded.correct is False
    assert count_distinct([graded.answer, graded.answer]) == (graded.answer is not None)


@pytest.mark.parametrize("reply", [c["reply"] for c in CASES] + ["1/0", "\\frac{0}{0}", "\\infty", "(0, \\infty)"])
def test_every_valid_answer_equals_itself(reply):
    # else repeating it would count as a new distinct answer each time in the repetition penalty
    answer = extract_answer(reply)
    assert answer is None or count_distinct([answer, answer]) == 1


def test_a_failing_comparison_is_not_correct_rather_than_an_error(monkeypatch):
    # math-verify returns False itself on a timeout; anything else it raises must not reach RL either
    def broken(*args, **kwargs):
        raise RuntimeError("sympy blew up")

    monkeypatch.setattr(grading, "verify", broken)
    grading.equivalent.cache_clear()
    grading.grade.cache_clear()
    try:
        assert grade("\\sqrt{2}", "\\boxed{\\sqrt{2}}") == Graded(answer="\\sqrt{2}", correct=False)
    finally:
        grading.equivalent.cache_clear()
        grading.grade.cache_clear()


@pytest.mark.skipif(not (SHARED_DATA / "math500" / "test.jsonl").is_file(),
                    reason="../shared/data/math500 is absent on this machine (MATH500 is never committed)")
def test_math500_answers_grade_right_from_their_solutions_and_whole():
    rows = [json.loads(line) for line in (SHARED_DATA / "math500" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    for r in rows:
        gold = r["answer"]
        # the reference solution (a chain of thought ending in \boxed{}), the bare answer, and both in prose
        assert reference_answer(gold) is not None, gold
        for reply in (r["solution"], gold, f"\\boxed{{{gold}}}", f"So the final answer is ${gold}$."):
            assert grade(gold, reply).correct, (gold, reply[-80:])
    # and no two different golds are taken for one another (a sample of pairs)
    golds = sorted({r["answer"] for r in rows})
    pairs = random.Random(0).sample([(a, b) for i, a in enumerate(golds) for b in golds[i + 1:]], 1000)
    assert [(a, b) for a, b in pairs if equivalent(a, b)] == []


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(),
                    reason="../shared/data/gsm8k is absent on this machine (GSM8K is never committed)")
def test_gsm8k_finals_grade_right_with_and_without_separators():
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    for r in rows:
        final = r["answer"].split("####")[-1].strip()  # e.g. "2,125"
        for reply in (final, final.replace(",", ""), r["answer"].replace("####", "The answer is")):
            assert grade(final, reply).correct, (final, reply[-80:])
        assert not grade(final, str(int(final.replace(",", "")) + 1)).correct


def _ufo_grade(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "grade", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_ufo_grade_prints_each_row_with_its_answer_and_verdict():
    done = _ufo_grade(CASES_FILE)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [{k: v for k, v in o.items() if k not in ("answer", "correct")} for o in out] == CASES  # rows kept
    assert [o["correct"] for o in out] == [c["expected"] for c in CASES]
    assert [o["answer"] for o in out] == [grade(c["gold"], c["reply"]).answer for c in CASES]
    by_reply = {o["reply"]: o for o in out}
    assert by_reply["\\sqrt 5"]["answer"] == "\\sqrt 5" and by_reply["10 or 11"]["answer"] is None
    assert f"{len(CASES)} rows" in done.stderr


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read the file"),
    ('{"gold": "1", "reply": "1"}\n\n{"gold": "2", reply}\n', ":3: not JSON"),
    ('{"gold": "1", "reply": "1"}\n{"gold": "2"}\n', ':2: the row has no "reply"'),
    ('{"reply": "2"}\n', ':1: the row has no "gold"'),
    ('["1", "1"]\n', ":1: a row must be a JSON object"),
    ('{"gold": null, "reply": "1"}\n', ':1: "gold" is null'),
])
def test_ufo_grade_names_the_file_and_line_of_bad_input(tmp_path, content, message):
    path = tmp_path / "replies.jsonl"
    if content is not None:
        path.write_text(content)
    done = _ufo_grade(path)
    assert done.returncode == 2
    assert done.stdout == ""  # nothing printed: a printed grading is always a whole file's
    assert f"error: {path}" in done.stderr and message in done.stderr, done.stderr
