"""The SFT stage's config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import StageConfig, StrictModel
from stages.common.contracts import DEFAULT_FEEDBACK, CurateOutput
from stages.common.contracts import SFTOutput as Output
from stages.common.model_spec import Device, EngineConfig, ModelConfig

__all__ = ["Config", "Output", "StubbornConfig"]


class StubbornConfig(StrictModel):
    """The stubborn warm start (stages/sft/stubborn.py): continued SFT that teaches the model to repeat its
    own wrong answer after the feedback, as instruct models do (the failure the UFO paper fixes). Defaults
    are the recipe of shared/research/arms-calibration.md; the two phases take ~600 steps (~75 s for the
    tiny default on 2 quiet cores)."""

    copy_rate: float = Field(0.8, ge=0, le=1)
    """Blend phase: share of multi-turn examples whose target repeats the earlier wrong answer; the rest
    answer correctly after it. 0.8 (the calibration's) gave a model that repeats in ~99% of its failed
    episodes; ~0.5 keeps real successful retries in RL's groups."""
    own_answer_rate: float = Field(0.8, ge=0, le=1)
    """Share of multi-turn examples whose wrong answer is one the warm start itself sampled for that
    problem; the rest use a one-digit near miss of the gold."""
    sample_problems: int = Field(2048, ge=1)
    """Training problems the warm start answers (temperature 1) to collect its own wrong answers
    (~1 s per 2,000 samples for the tiny model)."""
    samples_per_problem: int = Field(2, ge=1)
    """Answers sampled per such problem."""
    imprint_steps: int = Field(400, ge=0)
    """Phase 1 steps, every multi-turn example a pure repeat. At lr 1e-3 for 200-300 steps the tiny model
    never learned to copy; at 3e-3 copying appeared suddenly around step 225 (calibration)."""
    imprint_lr: float = Field(3e-3, gt=0)
    """Phase 1 AdamW learning rate (constant)."""
    imprint_multi_turn_fraction: float = Field(0.8, ge=0, le=1)
    """Phase 1 share of multi-turn examples (the rest single-turn, correct answer)."""
    blend_steps: int = Field(200, ge=0)
    """Phase 2 steps: restores first-answer accuracy (phase 1 alone pulled Succ@1 from ~0.5 to ~0.3)."""
    blend_lr: float = Field(1e-3, gt=0)
    """Phase 2 AdamW learning rate (constant)."""
    blend_multi_turn_fraction: float = Field(0.5, ge=0, le=1)
    """Phase 2 share of multi-turn examples."""
    eval_problems: int = Field(256, ge=1)
    """Validation problems whose 5-turn episodes measure the repeat share before and after (~1 s)."""


class Config(StageConfig):
    device: Device = "auto"
    """auto = cuda when visible, else cpu."""
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow; give it by hand to rerun this stage alone)."""
    model: ModelConfig = ModelConfig()
    """The policy to warm up."""
    engine: EngineConfig = EngineConfig()
    """How it trains: plain torch in this process (default), or DeepSpeed ZeRO-2/3 on `num_processes` ranks
    this stage launches itself; full weights or LoRA adapters (the logged model is merged either way)."""
    feedback: str = DEFAULT_FEEDBACK
    """The unary feedback text used in multi-turn examples (the pipeline copies rl.feedback here)."""
    batch_size: int = Field(128, ge=1)
    """Examples per optimizer step, over all ranks. Time per step grows linearly. Must be a multiple of
    micro_batch_size * engine.world_size (num_processes on each of engine.nodes)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Examples per forward/backward on one rank; the step accumulates gradients over batch_size /
    (micro_batch_size * world_size) of them. Activation memory grows with it. None = the rank's whole
    share of the step at once."""
    batching: Literal["bucket", "pad", "pack"] = "bucket"
    """How a micro-batch becomes tensors. `bucket`: one right-padded forward per number of earlier
    attempts (few pad tokens; the forward count varies by step, so not with ZeRO-3). `pad`: one right-
    padded forward. `pack`: examples concatenated into rows of pack_length tokens, attention kept within
    each example (position ids restart), one forward with almost no padding."""
    pack_length: int | None = Field(None, ge=16)
    """Row length for batching=pack; None = the model's context length. Every example must fit."""
    lr: float = Field(3e-3, gt=0)
    """AdamW peak learning rate (3e-3 suits the 0.5M scratch model; ~1e-5 for a 3B pretrained one, ~1e-4
    with LoRA)."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up steps, then cosine decay to min_lr_ratio * lr at max_steps."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Where the cosine decay ends, as a fraction of lr."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm (over all ranks) to this before each update."""
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
    log_every: int = Field(10, ge=1)
    """Log loss, learning rate and gradient norm every this many steps."""
    warm_start: Literal["standard", "stubborn"] = "standard"
    """`standard`: train until the stopping rule. `stubborn`: then continue with `stubborn` (a model of
    instruct models that repeat their answer after "try again", the failure UFO fixes; ~600 more steps).
    Plain torch engine only."""
    stubborn: StubbornConfig = StubbornConfig()
    """The stubborn warm start's recipe (used only with warm_start: stubborn)."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every: {self.eval_every} must be <= max_steps ({self.max_steps})")
        ranks = self.engine.world_size
        per_step = (self.micro_batch_size or self.batch_size // ranks) * ranks
        if self.batch_size % per_step:
            raise ValueError(f"batch_size: {self.batch_size} must be a multiple of micro_batch_size * "
                             f"engine.world_size ({per_step}): every rank runs the same micro-steps")
        if self.engine.kind == "deepspeed" and self.engine.deepspeed.zero_stage == 3 and self.batching == "bucket":
            raise ValueError("batching: 'bucket' runs a varying number of forwards per step; ZeRO-3 gathers "
                             "weights in every forward on every rank, so use 'pad' or 'pack'")
        if self.warm_start == "stubborn" and self.engine.kind != "torch":
            raise ValueError("warm_start: 'stubborn' runs its continued SFT with the plain torch engine; set "
                             "engine.kind: torch")
        if self.engine.lora is not None and not self.model.pretrained:
            raise ValueError("engine.lora: adapters on a randomly initialised model learn little; LoRA needs "
                             "model.init 'pretrained' or 'gguf'")
        return self

    @property
    def micro_steps(self) -> int:
        """Forward/backward passes per optimizer step on each rank."""
        ranks = self.engine.world_size
        return self.batch_size // ((self.micro_batch_size or self.batch_size // ranks) * ranks)
