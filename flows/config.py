"""The pipeline config: the four stage configs under `curate`, `sft`, `rl`, `evaluate`, plus what the
flow itself needs (retries), with the invariants that span stages checked at load time."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from stages import curate as curate_stage
from stages import evaluate as evaluate_stage
from stages import rl as rl_stage
from stages import sft as sft_stage
from stages.common.config import StrictModel

STAGES = ("curate", "sft", "rl", "evaluate")
StageName = Literal["curate", "sft", "rl", "evaluate"]
# Fields of each stage that the flow fills with upstream Outputs; a config file must not set them.
UPSTREAM_FIELDS = {"sft": ("data",), "rl": ("data", "sft"), "evaluate": ("data", "sft", "rl")}


class Retries(StrictModel):
    """How often the flow reruns a failed stage process before failing the pipeline."""

    curate: int = Field(0, ge=0)
    sft: int = Field(0, ge=0)
    rl: int = Field(0, ge=0)
    evaluate: int = Field(0, ge=0)


class FlowConfig(StrictModel):
    retries: Retries = Retries()
    """Per-stage retry counts (a stage is rerun from scratch; it starts a new MLflow child run)."""
    retry_delay_seconds: float = Field(5.0, ge=0)
    """Wait between a failed attempt and its retry."""
    stage_timeout_seconds: float | None = Field(None, gt=0)
    """Kill a stage process that runs longer than this; None = no limit."""


class PipelineConfig(StrictModel):
    experiment: str = "ufo"
    """MLflow experiment of the pipeline run and its stage runs (copied into each stage)."""
    seed: int = 0
    """Seed of every stage, unless a stage sets its own."""
    flow: FlowConfig = FlowConfig()
    """Orchestration settings; stages never see them."""
    curate: curate_stage.Config = curate_stage.Config()
    """Data curation (stages/curate.py)."""
    sft: sft_stage.Config = sft_stage.Config()
    """SFT warmup (stages/sft.py)."""
    rl: rl_stage.Config = rl_stage.Config()
    """Multi-turn RL with unary feedback (stages/rl/)."""
    evaluate: evaluate_stage.Config = evaluate_stage.Config()
    """Evaluation of the SFT and RL models (stages/evaluate.py)."""

    @model_validator(mode="before")
    @classmethod
    def _propagate(cls, data: Any) -> Any:
        """Fill shared values into the stages that did not set them: experiment and seed everywhere,
        and the episode protocol (feedback text, T) from `rl` into `sft` and `evaluate`."""
        if not isinstance(data, dict):
            return data
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
        rl_cfg = data.get("rl") if isinstance(data.get("rl"), dict) else {}
        for name in STAGES:
            stage = data.setdefault(name, {})
            if not isinstance(stage, dict):
                continue
            for key in ("experiment", "seed"):
                if key in data:
                    stage.setdefault(key, data[key])
            if name in ("sft", "evaluate") and "feedback" in rl_cfg:
                stage.setdefault("feedback", rl_cfg["feedback"])
        if isinstance(data["evaluate"], dict) and "max_turns" in rl_cfg:
            data["evaluate"].setdefault("max_turns", rl_cfg["max_turns"])
        return data

    @model_validator(mode="after")
    def _invariants(self) -> PipelineConfig:
        for stage, fields in UPSTREAM_FIELDS.items():
            for f in fields:
                if getattr(getattr(self, stage), f) is not None:
                    raise ValueError(f"{stage}.{f}: set by the flow from the upstream stage's output; remove it "
                                     "(to reuse an earlier stage, use `ufo run --from-run RUN_ID --only STAGE`)")
        model = self.sft.model
        if model.init == "scratch" and self.rl.max_episode_tokens > model.max_position_embeddings:
            raise ValueError(
                f"rl.max_turns: an episode of {self.rl.max_turns} turns can take {self.rl.max_episode_tokens} tokens "
                f"(rl.max_prompt_tokens + max_turns * (rl.max_new_tokens + 1) + (max_turns - 1) * "
                f"rl.max_feedback_tokens), more than sft.model.max_position_embeddings = "
                f"{model.max_position_embeddings}")
        if self.evaluate.max_turns > self.rl.max_turns and model.init == "scratch":
            eval_tokens = self.rl.model_copy(update={"max_turns": self.evaluate.max_turns}).max_episode_tokens
            if eval_tokens > model.max_position_embeddings:
                raise ValueError(f"evaluate.max_turns: {self.evaluate.max_turns} turns do not fit "
                                 f"sft.model.max_position_embeddings = {model.max_position_embeddings}")
        if self.sft.max_wrong_attempts >= self.rl.max_turns:
            raise ValueError(f"sft.max_wrong_attempts: {self.sft.max_wrong_attempts} must be < rl.max_turns "
                             f"({self.rl.max_turns}): SFT would teach longer conversations than an episode has")
        return self
