"""The curate stage's config: which datasets to read and how to split and clean them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from stages.common.config import StageConfig, StrictModel
from stages.common.contracts import CurateOutput as Output

__all__ = ["Config", "GSM8KSource", "MultiplicationSource", "Output"]


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

    @model_validator(mode="after")
    def _check(self) -> MultiplicationSource:
        if self.a_min > self.a_max or self.b_min > self.b_max:
            raise ValueError("a_max: a_min <= a_max and b_min <= b_max are required")
        return self


class GSM8KSource(StrictModel):
    """GSM8K in its original jsonl form: {"question", "answer"} with the final answer after '####'."""

    kind: Literal["gsm8k"] = "gsm8k"
    path: str
    """Folder holding train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k)."""
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Share of the train file held out for validation."""
    max_rows: int | None = Field(None, ge=1)
    """Keep at most this many rows per file (after shuffling); None keeps all."""


Source = Annotated[MultiplicationSource | GSM8KSource, Field(discriminator="kind")]


class Config(StageConfig):
    sources: list[Source] = Field(default_factory=lambda: [MultiplicationSource()], min_length=1)
    """Datasets to curate, concatenated."""
    max_question_chars: int = Field(2000, ge=1)
    """Rows with longer questions are quarantined."""
