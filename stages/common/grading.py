"""Answer extraction and grading by mathematical equivalence (math-verify), never by raw string.

`grade(gold, reply)` is what RL rewards and evaluation both use, so training and evaluation can never
disagree on what counts as correct. Distinctness for the repetition penalty uses the same equivalence:
`12`, `12.0` and `\\boxed{12}` are one answer.

How a reply is read (issue 9, point 3):
1. Its answer region: the last `\\boxed{}` (with the boxes just before it when only "," or "and" joins
   them: one list), else the rest of the line after the last "answer is" / "answer:" / "solutions are",
   else its last non-empty line. Math delimiters around the whole region and a final full stop are dropped.
2. A hedge is no answer: "10 or 11", "\\boxed{10} or \\boxed{11}", "maybe 12, maybe 13", "Is it 12?" give
   None (invalid), so a hedge is never correct and never counts as a distinct answer. One value stated
   twice ("15\\frac{39}{40}, or \\frac{639}{40}") is not a hedge.
3. A region that is only math (no words outside `\\text{}`-like groups and LaTeX commands) is read WHOLE
   by math-verify: `\\sqrt 5` is sqrt(5) (not 5), `(0, 4]` an interval (not 4), `10, 11, 12` a list, so a
   list of guesses never equals a single gold. If it does not parse, or its value is undefined (1/0),
   the reply is invalid; nothing inside it is fished out instead.
4. Otherwise (prose) math-verify searches the region, then the whole reply, as for a free-form solution.
5. When the gold is text (`\\text{Evelyn}`, `\\text{(C)}`, a plain word), the region is compared as
   normalised text (case, punctuation, `\\text{}` and a leading article ignored). For a math gold a word
   is no answer, so naming words cannot buy distinct answers.

Known limits: "x < 1 or x > 2" reads as a hedge, not as a union; a text answer inside a sentence with no
"answer is" ("The winner is Evelyn.") is compared as that whole sentence; 30^\\circ is not pi/6 (math-verify
does not convert degrees); (1,2) equals the list "1, 2" (math-verify reads a bare pair as the point).

Grading never raises: what math-verify cannot read is invalid (None), and a math-verify timeout
(5 s, main thread only: its alarm needs SIGALRM) makes a comparison "not correct".
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
# An integer with thousands separators ("1,234,567"; "1,\!234" in LaTeX): one value, not a list.
_THOUSANDS = re.compile(r"-?[1-9][0-9]{0,2}(?:,(?:\\!)?[0-9]{3})+")
# Groups holding words rather than math: units ("10 \text{ cm}"), labels, text answers.
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_COMMAND = re.compile(r"\\(?:begin|end)\s*\{[A-Za-z*]*\}|\\(?:[A-Za-z]+|.)")  # \begin{pmatrix}: no words
_DIGIT = re.compile(r"[0-9]")
_WORD = re.compile(r"[A-Za-z]{2,}")
_DOLLAR = re.compile(r"(?<!\\)\$")
# A pair of delimiters around a whole region: $...$, $$...$$, \(...\), \[...\].
_DELIMITED = re.compile(r"\$\$(.+)\$\$|\$(.+)\$|\\\((.+)\\\)|\\\[(.+)\\\]", re.S)
# The last "the answer is ..." / "Answer: ..." / "the solutions are ...": the rest of its line is the answer.
_ANCHOR = re.compile(r"\b(?:answers?|solutions?)\b(?:[^\n]{0,40}?\b(?:is|are|was|would be|will be)\b|\s*:)\s*:?", re.I)
# Hedges: "or" joining values ("10 or 11", "\frac12 or \frac13", "\boxed{1} or \boxed{2}",
# "10 \text{ or } 11"); a region that ends as a question; an uncertain word beside two or more numbers.
# ("add or subtract" is prose, not a hedge: the word before "or" must end a value or be a symbol).
_OR_AFTER_VALUE = re.compile(
    r"(?:[0-9)}\]]|(?<![A-Za-z])[A-Za-z]|\\[A-Za-z]+)\s*[,(]?\s*(?:\\(?:text|mbox|textrm)\s*\{\s*)?\bor\b", re.I)
_OR_SPLIT = re.compile(r"\s*,?\s*(?:\\(?:text|mbox|textrm)\s*\{\s*)?\bor\b(?:\s*\})?\s*", re.I)
_AND = re.compile(r"\s*,?\s*\band\b\s*", re.I)  # "1 and 2", "3, 5, and 7": lists
_UNSURE = re.compile(r"\b(?:maybe|perhaps|possibly|probably|could|might)\b", re.I)
_NUMBER = re.compile(r"[0-9]+(?:[.,][0-9]+)*")
_BOX_JOIN = re.compile(r"[\s$,]*(?:and|or|\\(?:text|mbox)\s*\{\s*(?:and|or)\s*\}|\\quad)?[\s$,]*", re.I)
_ARTICLE = re.compile(r"^(?:the|a|an) ")

# Entries per cache. Keys are whole replies (a chain of thought can be kilobytes), so the caches that hold
# replies stay at ~65k entries: ~130 MB at 2 kB a reply. Extracted answers are short: `equivalent` keeps 4x.
_CACHE = 1 << 16
# math-verify warns once when a timeout is off (worker threads); that is deliberate here.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Graded:
    answer: str | None
    """The extracted final answer (its LaTeX, as read); None when the reply holds none (invalid)."""
    correct: bool


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=_CACHE)
def _parse(text: str) -> tuple[tuple, str | None]:
    """math-verify's search of `text` (boxed first, then LaTeX, then plain numbers): the values it read,
    and the text of the first match it tried (usually, not always, the one the value came from)."""
    out = parse(text, fallback_mode="first_match", parsing_timeout=_timeout())
    source = out.pop() if out and isinstance(out[-1], str) else None
    return tuple(out), source


@lru_cache(maxsize=_CACHE)
def _parse_whole(text: str) -> tuple:
    """The value of `text` read as ONE LaTeX expression ("$...$" makes math-verify read all of it)."""
    return _parse(f"${' '.join(text.split())}$")[0]


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every `\\boxed{...}` / `\\fbox{...}`, braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append((m.start(), i, text[m.end(): i - 1]))
    return out


def _strip(region: str) -> str:
    region = region.strip().strip("*").strip()  # markdown bold
    region = region.removesuffix(".").strip()
    m = _DELIMITED.fullmatch(region)
    if m:
        region = next(g for g in m.groups() if g is not None).strip().removesuffix(".").strip()
    return region


def _answer_region(reply: str) -> tuple[str, bool]:
    """The part of the reply that states the final answer, and whether it is boxed (see module doc)."""
    boxes = _boxes(reply)
    if boxes:
        run = [boxes[-1]]
        for prev in reversed(boxes[:-1]):
            between = reply[prev[1]: run[0][0]]
            if not _BOX_JOIN.fullmatch(between):
                break
            if re.search(r"\bor\b", between, re.I):
                return f"{prev[2]} or {run[0][2]}", True  # "\boxed{10} or \boxed{11}": a hedge
            run.insert(0, prev)
        return ", ".join(_strip(c) for _, _, c in run), True
    anchors = list(_ANCHOR.finditer(reply))
    if anchors:
        tail = reply[anchors[-1].end():].strip()
        if tail:
            return _strip(tail.split("\n", 1)[0]), False
    lines = [line for line in reply.split("\n") if line.strip()]
    return (_strip(lines[-1]) if lines else ""), False


def _unhedge(region: str) -> str | None:
    """The region, or None when it hedges; "x or y" naming one value twice ("15\\frac{39}{40}, or
    \\frac{639}{40}", as MATH's own solutions do) is that value, in its last form."""
    if region.endswith("?") or (_UNSURE.search(region) and len(_NUMBER.findall(region)) >= 2):
        return None
    if not _OR_AFTER_VALUE.search(region):
        return region
    options = [o.strip() for o in _OR_SPLIT.split(region) if o.strip()]
    if len(options) > 1 and all(_is_bare_math(o) and equivalent(options[0], o) for o in options[1:]):
        return options[-1]
    return None


def _is_bare_math(region: str) -> bool:
    """True when the region is only math: no words once text groups and LaTeX commands are removed."""
    if _DOLLAR.search(region):
        return False
    return not _WORD.search(_COMMAND.sub(" ", _TEXT_GROUP.sub(" ", region)))


def _normalise_text(text: str) -> str:
    text = _TEXT_GROUP.sub(r" \1 ", text)
    text = _COMMAND.sub(" ", text)
    text = re.sub(r"[\W_]+", " ", text.casefold()).strip()
    return _ARTICLE.sub("", text)


@lru_cache(maxsize=_CACHE)
def _as_text(answer: str) -> str | None:
    """The normalised text of a text answer (`\\text{Evelyn}`, `\\text{(C)}`, `east`); None for math.

    Single letters outside a `\\text{}` group stay math (`x`, `p - q`), and anything with a digit, a
    LaTeX command or an operator is math (`5.4 \\text{ cents}`, `\\pi`, `y = 2x`).
    """
    if _DIGIT.search(answer):  # the hot path's integers leave here
        return None
    inner = _strip(answer)
    boxes = _boxes(inner)
    if len(boxes) == 1 and boxes[0][0] == 0 and boxes[0][1] == len(inner):
        inner = boxes[0][2].strip()
    whole_group = _TEXT_GROUP.fullmatch(inner) is not None
    plain = _TEXT_GROUP.sub(r"\1", inner)
    if re.search(r"[\\=^_+*/<>{}$]", plain):
        return None
    if not whole_group and not _WORD.search(plain):
        return None
    return _normalise_text(plain) or None


def _latex(value) -> str | None:
    try:
        # LaTeX, not str(): math-verify reads "\\sqrt{2}" back but not sympy's "sqrt(2)".
        return sympy.latex(value) if isinstance(value, (sympy.Basic, sympy.MatrixBase)) else str(value)
    except Exception:
        return None


@lru_cache(maxsize=_CACHE)
def extract_answer(reply: str) -> str | None:
    """The final answer of a model reply, as the LaTeX it was read from; None if it holds no readable value.

    See the module doc for the reading rules: "\\boxed{42}", "The answer is 42" and "42" give "42";
    "\\sqrt 5" gives "\\sqrt 5" (read whole); "10 or 11" and a text answer ("Evelyn") give None: a text
    answer is only read when the gold is text (`grade`). A bare integer, the common case on the RL hot
    path, never reaches sympy.
    """
    text = reply.strip()
    if _INT.fullmatch(text):
        return str(int(text))
    try:
        return _extract_math(text)
    except Exception:  # grading errors never reach the caller: unreadable is invalid
        return None


def _extract_math(text: str) -> str | None:
    region, boxed = _answer_region(text)
    region = _unhedge(region)
    if not region or _as_text(region) is not None:
        return None
    if _INT.fullmatch(region):
        return str(int(region))
    if _THOUSANDS.fullmatch(region):
        return str(int(re.sub(r"[^0-9-]", "", region)))
    listed = _AND.sub(", ", region)
    if _is_bare_math(listed):
        region = listed
    if boxed or _is_bare_math(region):
        return " ".join(region.split()) if _defined(_parse_whole(region)) else None
    values, read = _parse(region)
    if not values:
        values, read = _parse(text)
    if not _defined(values):
        return None
    if read and _INT.fullmatch(read):  # a number in a sentence, the common prose case: no round trip
        return str(int(read))
    # The answer as the reply wrote it when that reads back as the same value; sympy's LaTeX does not
    # always ("7i - 2" comes back as "7 i - 2", which math-verify reads with a symbol i, not the unit).
    if read and verify(list(values), list(_parse_whole(read)), timeout_seconds=_timeout()):
        return " ".join(read.split())
    return _latex(values[0])


def _defined(parsed: tuple) -> bool:
    """A value was read and it is defined: 1/0 and 0/0 equal nothing, not even themselves, so as answers
    they would each count as a new distinct answer in the repetition penalty."""
    return bool(parsed) and not any(isinstance(v, sympy.Basic) and v.has(sympy.zoo, sympy.nan) for v in parsed)


def _extract_text(reply: str) -> str | None:
    """A reply's answer when the gold is text: its region's normalised text, as `\\text{...}`."""
    region, _ = _answer_region(reply)
    if re.search(r"\bor\b", region, re.I) or region.endswith("?"):
        return None
    norm = _normalise_text(region)
    return f"\\text{{{norm}}}" if norm else None


def reference_answer(gold: str) -> str | None:
    """A reference (gold) answer as the grader reads it; None when it cannot, so no reply could match it.

    A text answer gives its normalised `\\text{...}`; anything else must be one math-verify value read
    whole ("2,125", "(3,4]", "\\text{(C)}" and "5.4 \\text{ cents}" all are). Curation can quarantine
    the golds this refuses; `extract_answer` is for replies and refuses text answers.
    """
    if _INT.fullmatch(gold.strip()):
        return str(int(gold))
    if _THOUSANDS.fullmatch(gold.strip()):
        return str(int(re.sub(r"[^0-9-]", "", gold)))
    try:
        text = _as_text(gold)
        if text is not None:
            return f"\\text{{{text}}}"
        return " ".join(gold.split()) if _defined(_parse_whole(gold)) else None
    except Exception:
        return None


@lru_cache(maxsize=4 * _CACHE)
def equivalent(a: str, b: str) -> bool:
    """True when two answers (reference or extracted) have the same value; `a` is the reference.

    Two plain integer literals compare as integers, exactly what math-verify concludes, without its
    sympy cost; two text answers compare as normalised text; everything else is read whole by
    math-verify and compared by its `verify` (numbers to 6 decimals, sets, intervals, tuples, equations).
    """
    if _INT.fullmatch(a.strip()) and _INT.fullmatch(b.strip()):
        return int(a) == int(b)
    try:
        ta, tb = _as_text(a), _as_text(b)
        if ta is not None or tb is not None:
            return ta == tb
        pa, pb = _parse_whole(a), _parse_whole(b)
        return bool(pa and pb and verify(list(pa), list(pb), timeout_seconds=_timeout()))
    except Exception:  # a comparison math-verify cannot make is "not equal", never an error
        return False


@lru_cache(maxsize=_CACHE)
def grade(gold: str, reply: str) -> Graded:
    """The reply's final answer and whether it equals the gold (read as text when the gold is text)."""
    if _INT.fullmatch(gold) and _INT.fullmatch(reply):  # the RL hot path: two regexes, no sympy
        return Graded(answer=str(int(reply)), correct=int(gold) == int(reply))
    answer = _extract_text(reply) if _as_text(gold) is not None else extract_answer(reply)
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
