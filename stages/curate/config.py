"""The curate stage's config: which datasets to read, in which role, and how to clean and split them.

A source is one entry of `sources`, discriminated by `kind` (its schema): `multiplication` (the
synthetic default), `gsm8k`, `math` (MATH and MATH-500), `metamathqa`, or `generic` (any other QA
set, mapped by config alone). Every kind but `multiplication` reads either a Hugging Face hub dataset
(`hf:` + `revision:`, through `datasets.load_dataset`, offline from the local cache when
HF_HUB_OFFLINE=1) or local files (`path:`, jsonl/json/parquet/csv/arrow).

    sources:
      - kind: gsm8k                        # train role: split into train/val by content hash
        path: /data/gsm8k/train.jsonl
      - kind: gsm8k                        # eval role: kept whole as artifact eval/gsm8k
        path: /data/gsm8k/test.jsonl
        role: eval
      - kind: metamathqa
        hf: meta-math/MetaMathQA
        revision: 0123456789abcdef0123456789abcdef01234567
        types: ["MATH_*"]
      - kind: generic
        path: trivia.csv
        question: "{context} {question}"
        answer: label
        answer_regex: "(-?\\d+)"
"""

from __future__ import annotations

import re
import string
from pathlib import PurePath
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from stages.common.config import StageConfig, StrictModel
from stages.common.contracts import CurateOutput as Output

__all__ = ["Config", "GSM8KSource", "GenericSource", "MATHSource", "MetaMathQASource", "MultiplicationSource",
           "Output"]

#: Formats `path:` sources are read in; the default comes from the file suffix.
FileFormat = Literal["jsonl", "json", "parquet", "csv", "arrow"]
SUFFIX_FORMATS: dict[str, FileFormat] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class MultiplicationSource(StrictModel):
    """Every product a*b with a in [a_min, a_max] and b in [b_min, b_max], split by problem."""

    kind: Literal["multiplication"] = "multiplication"
    a_min: int = 100
    a_max: int = 999
    """3-digit x 1-digit is what a 0.5M-param model learns in ~2 minutes on 2 CPU cores; 2x2-digit is far slower."""
    b_min: int = 2
    b_max: int = 9
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of problems held out for validation (the SFT stopping rule reads it)."""
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of problems held out for the final evaluation."""

    @property
    def name(self) -> str:
        return "multiplication"

    @property
    def source_name(self) -> str:
        return self.name

    @property
    def role(self) -> str:
        return "train"

    @model_validator(mode="after")
    def _check(self) -> MultiplicationSource:
        if self.a_min > self.a_max or self.b_min > self.b_max:
            raise ValueError("a_max: a_min <= a_max and b_min <= b_max are required")
        return self


class _DataSource(StrictModel):
    """Where a real dataset comes from (hub or files), its role, and how a `train` one is split."""

    hf: str | None = None
    """A Hugging Face hub dataset id (`openai/gsm8k`), read with `datasets.load_dataset`. Needs `revision`.
    With HF_HUB_OFFLINE=1 it is read from the local HF cache (download it once with network access)."""
    config: str | None = None
    """The hub dataset's config name (`main` for openai/gsm8k); None = its default."""
    split: str = "train"
    """The hub dataset's split to read."""
    revision: str | None = None
    """The commit sha (40 hex) the hub dataset is pinned to. A cached copy of another commit is refused."""
    cache_dir: str | None = None
    """The `datasets` cache to read and fill; None = HF_DATASETS_CACHE (~/.cache/huggingface/datasets)."""
    path: str | list[str] | None = None
    """Local file(s) or glob(s), read through `datasets`; `~` and environment variables are expanded, so
    a shared config can say `${UFO_DATA}/gsm8k/train.jsonl`. jsonl is read line by line (a bad line is
    quarantined with its line number, the rest kept); a JSON array is decoded whole (~2x its size in memory)."""
    format: FileFormat | None = None
    """Format of `path`; None = from the suffix (.jsonl/.ndjson, .json, .parquet, .csv, .arrow)."""
    role: Literal["train", "eval"] = "train"
    """`train`: split into train/val (and test if `test_fraction` > 0) by content hash. `eval`: kept whole
    as the curate artifact `eval/<name>`, never trained on; train/val rows are decontaminated against it."""
    name: str | None = None
    """The source's name: its rows' `source` column and its eval artifact `eval/<name>`. None = the kind
    (`generic`: the file stem or the hub dataset's name). Must be unique across sources."""
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    """`train` role: share of rows (by content hash of the question) held out for validation."""
    test_fraction: float = Field(0.0, ge=0, lt=0.5)
    """`train` role: share of rows held out as the `test` split; 0 = none (evaluate on `eval` sources)."""
    max_rows: int | None = Field(None, ge=1)
    """Read only the first N records of each file (for quick trials); None = all."""

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.fullmatch(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '.' and '-' (it names an artifact)")
        return v

    @model_validator(mode="after")
    def _origin(self) -> _DataSource:
        if (self.hf is None) == (self.path is None):
            raise ValueError("path: give exactly one of `hf` (a hub dataset) or `path` (local files)")
        if self.hf is not None:
            if self.revision is None or not _SHA.fullmatch(self.revision):
                raise ValueError(f"revision: a hub dataset needs the 40-hex commit sha it is pinned to, got "
                                 f"{self.revision!r} (a branch name would let the data change under you)")
        else:
            for field in ("config", "revision", "cache_dir"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field}: only for hub datasets (`hf`), not for `path`")
        if self.role == "eval":
            # Compared with the default, not "was it set": a config dumped in full (what the flow hands
            # a stage) holds every field and must validate again.
            for field in ("val_fraction", "test_fraction"):
                if getattr(self, field) != type(self).model_fields[field].default:
                    raise ValueError(f"{field}: an eval source is kept whole; remove it")
        return self

    @property
    def paths(self) -> list[str]:
        return [] if self.path is None else [self.path] if isinstance(self.path, str) else list(self.path)

    def file_format(self, path: str) -> FileFormat | None:
        """`format`, else the one the file's suffix names; None when neither says."""
        return self.format or SUFFIX_FORMATS.get(PurePath(path).suffix.lower())

    def default_name(self) -> str:
        return self.kind  # type: ignore[attr-defined]

    @property
    def source_name(self) -> str:
        return self.name or self.default_name()


class GSM8KSource(_DataSource):
    """GSM8K's schema: `question`, and `answer` = solution ending in `#### <final>` (thousands commas removed)."""

    kind: Literal["gsm8k"] = "gsm8k"


class MATHSource(_DataSource):
    """MATH / MATH-500: `problem`, `solution` (final answer in its last \\boxed{}), and when present
    `answer` (taken as the final answer), `level` and `subject` (MATH's `type`)."""

    kind: Literal["math"] = "math"


class MetaMathQASource(_DataSource):
    """MetaMathQA: `query`, `response` ending in "The answer is: X", `type`, `original_question`.
    Rows are split by their original question, so rephrasings of one problem share a split."""

    kind: Literal["metamathqa"] = "metamathqa"
    types: list[str] | None = None
    """Keep only rows whose `type` matches one of these globs (UFO trains on `MATH_*`); None = all.
    Rows left out are counted as `filtered_out` in the manifest, not as read."""


class GenericSource(_DataSource):
    """Any other QA set, mapped without code: a question template over columns, an answer column and an
    optional regex extracting the final answer from it."""

    kind: Literal["generic"] = "generic"
    question: str
    """Template of the question over the row's columns, e.g. "{context}\\n\\n{question}" (str.format syntax).
    Every column it names must hold a string or a number."""
    answer: str
    """Column holding the answer (a string or a number)."""
    answer_regex: str | None = None
    """Regex applied to the answer; its LAST match gives the final answer (group 1 when it has groups).
    No match quarantines the row (unparseable_answer). None = the whole answer, stripped."""
    solution: str | None = None
    """Column holding a worked solution, kept in the optional `solution` column; None = none."""

    @field_validator("question")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as err:
            raise ValueError(f"{v!r} is not a str.format template ({err})") from None
        if not fields or any(not f or "." in f or "[" in f for f in fields):
            raise ValueError(f"{v!r}: name columns in braces, e.g. '{{question}}' (no '{{}}', no '.' or '[')")
        return v

    @field_validator("answer_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"{v!r} is not a valid regex ({err})") from None
        return v

    def template_columns(self) -> list[str]:
        return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.question) if f))

    def default_name(self) -> str:
        return PurePath(self.hf).name if self.hf else PurePath(self.paths[0]).name.split(".")[0]


DataSource = GSM8KSource | MATHSource | MetaMathQASource | GenericSource
Source = Annotated[MultiplicationSource | DataSource, Field(discriminator="kind")]


class Config(StageConfig):
    sources: list[Source] = Field(default_factory=lambda: [MultiplicationSource()], min_length=1)
    """Datasets to curate, in priority order: a duplicate keeps its first occurrence. At least one must
    have role `train`."""
    max_question_chars: int = Field(2000, ge=1)
    """Longer questions are quarantined (question_too_long)."""
    max_question_tokens: int | None = Field(None, ge=1)
    """Also quarantine questions longer than this many tokens of `tokenizer` (e.g. the model's context
    minus room for answers and feedback turns). Costs one tokenizer pass over every question: ~70 us of
    CPU each with a byte-level BPE (measured on a busy 2-core machine), ~30 s of CPU per 400k."""
    tokenizer: str | None = None
    """A local `tokenizer.json`, or a folder holding one (a `save_pretrained` model folder), for
    `max_question_tokens`. Never downloaded."""
    verify_answers: bool = True
    """Quarantine rows whose final answer math-verify cannot read (the grader could never mark it right).
    Plain numbers are free; ~10 ms per DISTINCT other answer (LaTeX), shared by all rows that have it."""
    decontamination_ngram: int = Field(13, ge=4)
    """n of the word n-gram overlap test: a train/val row sharing any n consecutive normalised words with
    an eval row is removed (13, as in GPT-3's contamination study). Exact normalised matches are always
    removed. Eval questions shorter than n words are caught only by the exact match."""
    num_proc: int | None = Field(None, ge=1)
    """Processes for `datasets.map` on large sources (>= 20k rows); None = all CPU cores, at most 8."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        seen: dict[str, int] = {}
        for i, src in enumerate(self.sources):
            name = src.source_name
            if name in seen:
                raise ValueError(f"sources.{i}.name: {name!r} is already the name of sources.{seen[name]}; "
                                 f"give each source a distinct `name` (e.g. name: {name}-{src.role})")
            seen[name] = i
        if not any(src.role == "train" for src in self.sources):
            raise ValueError("sources: at least one source needs role `train` (the train and val splits)")
        if (self.max_question_tokens is None) != (self.tokenizer is None):
            raise ValueError("tokenizer: max_question_tokens and tokenizer go together (set both or neither)")
        return self
