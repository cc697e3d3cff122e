"""The evaluate stage's config."""

from __future__ import annotations

from pydantic import Field, model_validator

from stages.common.config import StageConfig
from stages.common.contracts import DEFAULT_FEEDBACK, CurateOutput, RLOutput, SFTOutput
from stages.common.contracts import EvaluateOutput as Output
from stages.common.model_spec import Device

__all__ = ["Config", "Output"]


class Config(StageConfig):
    device: Device = "auto"
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow)."""
    sft: SFTOutput | None = None
    """The SFT model to evaluate (set by the flow)."""
    rl: RLOutput | None = None
    """The RL model to evaluate (set by the flow)."""
    split: str = "test"
    """Which curated split to evaluate on."""
    max_problems: int | None = Field(None, ge=1)
    """Evaluate on the first N problems only; None = the whole split (720 for the tiny default)."""
    max_turns: int = Field(5, ge=1)
    """T for Succ@k; the pipeline copies rl.max_turns here unless set."""
    feedback: str = DEFAULT_FEEDBACK
    """The feedback text; the pipeline copies rl.feedback here unless set."""
    num_samples: int = Field(10, ge=1)
    """n single-turn samples per problem for Pass@k; must be >= max_turns. Cost grows linearly."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the multi-turn episodes and the single-turn samples."""
    max_new_tokens: int = Field(8, ge=1)
    """Most tokens per answer."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.num_samples < self.max_turns:
            raise ValueError(f"num_samples: {self.num_samples} must be >= max_turns ({self.max_turns}) "
                             "to estimate Pass@k for every k <= T")
        return self
