"""Built-in schemas: one raw record (a dict, as read from a file or a hub dataset) -> the normalised row
fields, or a `Rejected` with the quarantine reason. Pure functions, no I/O.

Final answers, as each dataset's authors define them:
- GSM8K (Cobbe et al. 2021, openai/grade-school-math): the text after the last `####`, thousands
  separators removed (`2,125` -> `2125`).
- MATH (Hendrycks et al. 2021) and MATH-500 (PRM800K): the `answer` field when present, else the
  content of the last `\\boxed{...}` of the solution, nested braces included.
- MetaMathQA (Yu et al. 2023): the text after the last "The answer is:" of the response.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from stages.curate.config import DataSource, GenericSource, GSM8KSource, MATHSource, MetaMathQASource

# Quarantine reasons, one per way a row can be unusable. The manifest counts rows by these names.
INVALID_UTF8 = "invalid_utf8"
NOT_JSON = "not_json"
WRONG_TYPE = "wrong_type"
MISSING_QUESTION = "missing_question"
EMPTY_QUESTION = "empty_question"
QUESTION_TOO_LONG = "question_too_long"
MISSING_ANSWER = "missing_answer"
UNPARSEABLE_ANSWER = "unparseable_answer"
REASONS = (INVALID_UTF8, NOT_JSON, WRONG_TYPE, MISSING_QUESTION, EMPTY_QUESTION, QUESTION_TOO_LONG,
           MISSING_ANSWER, UNPARSEABLE_ANSWER)


class Rejected(Exception):  # noqa: N818 (a verdict, not a failure)
    """A row goes to quarantine with this reason and a one-line detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class FilteredOut(Exception):  # noqa: N818
    """The row is outside the source's declared selection (e.g. a MetaMathQA `types` filter)."""


@dataclass
class Extracted:
    question: str
    answer: str
    solution: str | None = None
    level: int | None = None
    subject: str | None = None
    group: str | None = None
    """What the split is keyed on when it is not the question (MetaMathQA: the original question)."""


def _text(rec: dict, field: str, missing: str) -> str:
    """A required string field; absent or null -> `missing`, any other type -> wrong_type."""
    value = rec.get(field)
    if value is None:
        raise Rejected(missing, f"no {field!r} field" if field not in rec else f"{field!r} is null")
    if not isinstance(value, str):
        raise Rejected(WRONG_TYPE, f"{field!r} is {type(value).__name__}, not a string")
    return value


def _optional_text(rec: dict, field: str) -> str | None:
    value = rec.get(field)
    return value if isinstance(value, str) and value.strip() else None


def gsm8k_final(answer: str) -> str | None:
    """The final answer of a GSM8K solution: after the last '####', thousands commas removed."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return final or None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces included; None if
    there is none or its braces do not close. `\\boxed 5` (no braces) gives "5"."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i] == " ":  # "\boxed 5": up to the closing $ or whitespace
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip() or None
    return None


_METAMATH_MARK = "The answer is"


def metamath_final(response: str) -> str | None:
    """The final answer of a MetaMathQA response: after the last "The answer is" (and its colon)."""
    at = response.rfind(_METAMATH_MARK)
    if at < 0:
        return None
    final = response[at + len(_METAMATH_MARK):].lstrip(" :").strip()
    return final or None


def _level(value: object) -> int | None:
    """MATH levels: 3 or "Level 3" -> 3; anything else (e.g. "Level ?") -> None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", value)):
        return int(m.group(1))
    return None


def extract_gsm8k(rec: dict) -> Extracted:
    question = _text(rec, "question", MISSING_QUESTION)
    answer = _text(rec, "answer", MISSING_ANSWER)
    final = gsm8k_final(answer)
    if final is None:
        raise Rejected(UNPARSEABLE_ANSWER, "no '#### <final answer>' in 'answer'")
    return Extracted(question, final, solution=answer.rsplit("####", 1)[0].strip() or None)


def extract_math(rec: dict) -> Extracted:
    question = _text(rec, "problem", MISSING_QUESTION)
    solution = rec.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise Rejected(WRONG_TYPE, f"'solution' is {type(solution).__name__}, not a string")
    if rec.get("answer") is not None:
        final = _text(rec, "answer", MISSING_ANSWER).strip()
        if not final:
            raise Rejected(MISSING_ANSWER, "'answer' is empty")
    elif solution is None:
        raise Rejected(MISSING_ANSWER, "neither an 'answer' nor a 'solution' field")
    elif (final := last_boxed(solution)) is None:
        raise Rejected(UNPARSEABLE_ANSWER, "no closed \\boxed{...} in 'solution' and no 'answer' field")
    return Extracted(question, final, solution=solution, level=_level(rec.get("level")),
                     subject=_optional_text(rec, "subject") or _optional_text(rec, "type"))


def extract_metamathqa(rec: dict, types: list[str] | None) -> Extracted:
    if types is not None:
        kind = rec.get("type")
        if not isinstance(kind, str):
            raise Rejected(WRONG_TYPE, f"'type' is {type(kind).__name__}, not a string: the types filter "
                                       "cannot place the row")
        if not any(fnmatch.fnmatchcase(kind, g) for g in types):
            raise FilteredOut
    question = _text(rec, "query", MISSING_QUESTION)
    response = _text(rec, "response", MISSING_ANSWER)
    final = metamath_final(response)
    if final is None:
        raise Rejected(UNPARSEABLE_ANSWER, "no 'The answer is: X' in 'response'")
    return Extracted(question, final, solution=response, subject=_optional_text(rec, "type"),
                     group=_optional_text(rec, "original_question"))


def _scalar(rec: dict, column: str, missing: str) -> str:
    """A generic-mapping column: strings as they are, numbers as text; other types are wrong_type."""
    value = rec.get(column)
    if value is None:
        raise Rejected(missing, f"no {column!r} column" if column not in rec else f"{column!r} is null")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise Rejected(WRONG_TYPE, f"{column!r} is {type(value).__name__}, not a string or a number")


def extract_generic(rec: dict, src: GenericSource, answer_re: re.Pattern | None) -> Extracted:
    values = {c: _scalar(rec, c, MISSING_QUESTION) for c in src.template_columns()}
    question = src.question.format_map(values)
    answer = _scalar(rec, src.answer, MISSING_ANSWER).strip()
    if not answer:
        raise Rejected(MISSING_ANSWER, f"{src.answer!r} is empty")
    if answer_re is not None:
        last = None
        for last in answer_re.finditer(answer):  # noqa: B007 (the last match is the final answer)
            pass
        if last is None:
            raise Rejected(UNPARSEABLE_ANSWER, f"answer_regex {answer_re.pattern!r} does not match {src.answer!r}")
        answer = (last.group(1) if answer_re.groups else last.group(0)) or ""
        answer = answer.strip()
        if not answer:
            raise Rejected(UNPARSEABLE_ANSWER, f"answer_regex {answer_re.pattern!r} matched an empty answer")
    solution = _optional_text(rec, src.solution) if src.solution else None
    return Extracted(question, answer, solution=solution)


def extractor(src: DataSource) -> Callable[[dict], Extracted]:
    """The function record -> Extracted for a source's schema (picklable for worker processes)."""
    if isinstance(src, GSM8KSource):
        return extract_gsm8k
    if isinstance(src, MATHSource):
        return extract_math
    if isinstance(src, MetaMathQASource):
        return partial(extract_metamathqa, types=src.types)
    if isinstance(src, GenericSource):
        return partial(extract_generic, src=src, answer_re=re.compile(src.answer_regex) if src.answer_regex else None)
    raise TypeError(f"no schema for {type(src).__name__}")
