"""The SFT stage's config."""

from __future__ import annotations

from pydantic import Field, model_validator

from stages.common.config import StageConfig
from stages.common.contracts import DEFAULT_FEEDBACK, CurateOutput
from stages.common.contracts import SFTOutput as Output
from stages.common.model_spec import Device, ModelConfig

__all__ = ["Config", "Output"]


class Config(StageConfig):
    device: Device = "auto"
    """auto = cuda when visible, else cpu."""
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow; give it by hand to rerun this stage alone)."""
    model: ModelConfig = ModelConfig()
    """The policy to warm up."""
    feedback: str = DEFAULT_FEEDBACK
    """The unary feedback text used in multi-turn examples (the pipeline copies rl.feedback here)."""
    batch_size: int = Field(128, ge=1)
    """Examples per optimizer step. Time per step grows linearly."""
    lr: float = Field(3e-3, gt=0)
    """AdamW peak learning rate (3e-3 suits the 0.5M scratch model; ~1e-5 for a 3B pretrained one)."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up steps, then cosine decay to 10% at max_steps."""
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int = Field(1200, ge=1)
    """Hard cap on optimizer steps (~8 steps/s for the tiny default on 2 cores)."""
    eval_every: int = Field(50, ge=1)
    """Check the stopping rule every this many steps."""
    target_val_accuracy: float = Field(0.40, gt=0, le=1)
    """Stop once sampled (temperature 1) single-turn accuracy on the val split reaches this."""
    val_problems: int = Field(256, ge=1)
    """Validation problems sampled for the stopping rule (~0.3 s per check at 256)."""
    multi_turn_fraction: float = Field(0.5, ge=0, le=1)
    """Share of examples with 1..max_wrong_attempts earlier wrong attempts followed by feedback. Measured
    on the tiny default (2 seeds each): 0.3 -> Succ@5 - Succ@1 of 0.07-0.10, 0.5 -> 0.27."""
    max_wrong_attempts: int = Field(4, ge=1)
    """Most wrong attempts before the final answer in a multi-turn example (keep < rl.max_turns)."""
    max_new_tokens: int = Field(8, ge=1)
    """Answer length cap when sampling for validation."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every: {self.eval_every} must be <= max_steps ({self.max_steps})")
        return self
