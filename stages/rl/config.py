"""The RL stage's config: the episode protocol (T, gamma, lambda, feedback) and the optimiser."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import StageConfig
from stages.common.contracts import DEFAULT_FEEDBACK, CurateOutput, SFTOutput
from stages.common.contracts import RLOutput as Output
from stages.common.model_spec import Device

__all__ = ["Config", "Output"]


class Config(StageConfig):
    device: Device = "auto"
    """auto = cuda when visible, else cpu."""
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow)."""
    sft: SFTOutput | None = None
    """The SFT stage's Output: the starting policy and the KL reference (set by the flow)."""
    algorithm: Literal["grpo"] = "grpo"
    """Policy-gradient estimator. GRPO: group-normalised episode returns, no critic."""
    max_turns: int = Field(5, ge=1)
    """T: most answers per episode (paper: 5). Rollout time grows with it."""
    gamma: float = Field(0.5, gt=0, le=1)
    """γ: a correct answer at 0-based turn t earns γ**t (paper: 0.5)."""
    repetition_penalty: float = Field(0.5, ge=0)
    """λ: at episode end, subtract λ·(1 − E/T), E distinct valid answers of the T given (paper: 0.5)."""
    feedback: str = DEFAULT_FEEDBACK
    """The unary feedback appended as the next user turn after a wrong answer."""
    steps: int = Field(130, ge=1)
    """Policy updates (rollout + update). ~0.9 s each for the tiny default on 2 cores."""
    problems_per_step: int = Field(32, ge=1)
    """Problems sampled per step (paper: 8)."""
    group_size: int = Field(8, ge=2)
    """Episodes per problem; advantages are normalised within each group (paper: 16)."""
    minibatch_size: int = Field(256, ge=1)
    """Episodes per gradient step; must divide problems_per_step * group_size."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout batch. 1 = on-policy (ratio starts at 1)."""
    lr: float = Field(2e-4, gt=0)
    """AdamW learning rate. For the tiny default >= 5e-4 lets the policy game the repetition penalty."""
    clip_low: float = Field(0.2, gt=0, lt=1)
    """PPO ratio clip below 1 (paper: 0.2)."""
    clip_high: float = Field(0.28, gt=0)
    """PPO ratio clip above 1 (paper: 0.28, "clip-higher")."""
    kl_coef: float = Field(0.01, ge=0)
    """Weight of the k3 KL estimate to the frozen SFT reference (paper: 0.001). 0 skips the reference model."""
    scale_advantages: bool = True
    """Divide group-centred returns by the group std (GRPO); False only centres them (Dr. GRPO)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts; log-probs in the loss use the same temperature."""
    max_new_tokens: int = Field(8, ge=1)
    """Most tokens per answer. An answer cut off here gets no eos and is usually invalid."""
    max_prompt_tokens: int = Field(32, ge=1)
    """Longest question prompt allowed, in tokens (longer prompts are an error naming the row)."""
    max_feedback_tokens: int = Field(8, ge=1)
    """Upper bound on the template tokens of one feedback turn (4 with the tiny tokenizer, ~15 with Qwen's)."""
    grad_clip: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Config:
        batch = self.problems_per_step * self.group_size
        if batch % self.minibatch_size:
            raise ValueError(f"minibatch_size: {self.minibatch_size} must divide problems_per_step * group_size "
                             f"({self.problems_per_step} * {self.group_size} = {batch})")
        if self.clip_low >= 1:
            raise ValueError("clip_low: must be < 1")
        return self

    @property
    def max_episode_tokens(self) -> int:
        """Worst-case episode length: prompt + T answers + (T-1) feedback turns (+1 closing eos each)."""
        return self.max_prompt_tokens + self.max_turns * (self.max_new_tokens + 1) \
            + (self.max_turns - 1) * self.max_feedback_tokens
