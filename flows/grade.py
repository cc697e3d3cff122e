"""`ufo grade FILE.jsonl`: grade replies against golds and show what was read from each.

Each line of FILE is a JSON object with "gold" and "reply" (text; a JSON number is read as its text);
other fields pass through. Each output line (stdout, JSON) is that row plus "answer", what the grader
extracted from the reply (null when it holds no readable answer: empty, a hedge such as "10 or 11",
LaTeX that does not parse), and "correct". A count goes to stderr. The grader is the one RL rewards and
evaluation use (`stages.common.grading.grade`), so this shows exactly how a reply was scored.

Bad input stops the command before it prints any row, with exit 2 and the file and line: a missing or
unreadable file, a line that is not UTF-8 or not JSON, a row that is not an object, lacks "gold" or
"reply", or holds something other than text or a number there. So a printed grading is always a whole
file's. Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class GradeInputError(ValueError):
    """The input file cannot be graded; the message names the file and line."""


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise GradeInputError(f'{where}: the row has no "{key}" (each row is {{"gold": ..., "reply": ...}})')
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise GradeInputError(f'{where}: "{key}" is {json.dumps(value)}; it must be text or a number')
    return value if isinstance(value, str) else json.dumps(value)


def read_rows(path: Path) -> list[tuple[dict, str, str]]:
    """(row, gold, reply) for every non-blank line of a JSONL file; GradeInputError names file and line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise GradeInputError(f"{path}: cannot read the file ({err.strerror or err})") from None
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise GradeInputError(f"{where}: not UTF-8 text") from None
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise GradeInputError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise GradeInputError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
        rows.append((row, _text(row, "gold", where), _text(row, "reply", where)))
    return rows


def cmd_grade(args) -> int:
    """Grade every row of `args.file`; 0 when the file was graded (whatever the verdicts), 2 on bad input."""
    try:
        rows = read_rows(Path(args.file))
    except GradeInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from stages.common.grading import grade  # imports sympy and math-verify (~1 s): only for a good file

    correct = invalid = 0
    try:
        for row, gold, reply in rows:
            graded = grade(gold, reply)
            correct += graded.correct
            invalid += graded.answer is None
            print(json.dumps({**row, "answer": graded.answer, "correct": graded.correct}, ensure_ascii=False))
        sys.stdout.flush()
    except BrokenPipeError:  # `ufo grade F | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"{args.file}: {len(rows)} rows, {correct} correct, {invalid} without a readable answer", file=sys.stderr)
    return 0
