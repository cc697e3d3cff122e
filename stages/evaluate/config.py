"""The evaluate stage's config."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import StageConfig
from stages.common.contracts import DEFAULT_FEEDBACK, CurateOutput, RLOutput, SFTOutput
from stages.common.contracts import EvaluateOutput as Output
from stages.common.model_spec import Device

__all__ = ["Config", "Output"]

Inference = Literal["feedback", "no_feedback"]
#: stages.common.stats.Resampling, spelled out here: configs import no numpy (tests check they agree).
Resampling = Literal["problems", "seeds_as_strata"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Config(StageConfig):
    device: Device = "auto"
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow)."""
    sft: SFTOutput | None = None
    """The SFT model to evaluate (set by the flow)."""
    rl: RLOutput | None = None
    """The RL model to evaluate (set by the flow)."""
    base: bool = False
    """Also evaluate the model SFT started from (the SFT Output's `base_model`: a pretrained start,
    imported once into MLflow), as `base`, on the same problems and with the same sampling: where the
    pipeline started, beside where SFT and RL took it (e.g. the share of failed episodes that repeat an
    earlier answer after the feedback, before any training). Needs `sft.model.init` `pretrained` or
    `gguf`. Costs one model's evaluation more; a base model that rambles to `max_new_tokens` costs more."""
    models: dict[str, str] = {}
    """More models to evaluate beside `sft` and `rl`, name -> MLflow model URI: `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `runs:/RUN_ID/model` (a `save_pretrained` folder or an MLflow transformers
    model), or a local folder. Downloaded through MLflow, loaded with transformers' `from_pretrained`;
    the digest of what was evaluated is logged as param `models.<name>.sha256`. Each adds the time of one
    model's evaluation (the smoke config's 200 problems, both conditions: ~1-1.5 s for the tiny model on
    2 quiet cores, measured once; far more on a busy machine)."""
    sets: list[str] | None = None
    """Which evaluation sets: names from the curate Output (`test` for the held-out split, `<name>` for
    each `eval/<name>` set). None = every one of them."""
    max_problems: int | None = Field(None, ge=1)
    """Evaluate on the first N problems of each set only; None = whole sets (720 for the tiny test split)."""
    max_turns: int = Field(5, ge=1)
    """T for Succ@k; the pipeline copies rl.max_turns here unless set."""
    feedback: str = DEFAULT_FEEDBACK
    """The feedback text; the pipeline copies rl.feedback here unless set."""
    inference: list[Inference] = Field(["feedback", "no_feedback"], min_length=1)
    """Conditions of the multi-turn episodes. `feedback`: after a wrong answer the user turn holds the
    feedback text (the UFO protocol). `no_feedback`: the same conversation with an EMPTY user turn
    instead: the model still sees its earlier answers but is never told they were wrong (as the paper's
    code does for its no-feedback variant), so the comparison `<model>_vs_<model>_no_feedback` measures
    what the feedback itself adds at inference (the paper's finding 4). Each condition costs one
    multi-turn rollout per model and set: both take ~1.4-1.8x the time of `[feedback]` alone
    (benchmarks/evaluate.py, busy 2-core machine)."""
    episodes_per_problem: int = Field(1, ge=1)
    """Multi-turn episodes per problem and condition; more shrink the sampling noise of Succ@k (the
    interval still resamples problems). Cost grows linearly."""
    num_samples: int = Field(10, ge=1)
    """n single-turn samples per problem for Pass@k; must be >= max_turns. Cost grows linearly."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the multi-turn episodes and the single-turn samples."""
    rollout_engine: Literal["hf", "cached", "paged"] = "hf"
    """What samples the answers (stages/common/rollout_engines.py): `hf` (`generate`), `cached` (each
    episode's keys/values kept across turns, each prompt run once for all its samples: far fewer positions
    run, see benchmarks/rollout.py) or `paged` (transformers' continuous batching). Same protocol and
    distribution; the samples differ (each draws its random numbers its own way)."""
    max_new_tokens: int = Field(8, ge=1)
    """Most tokens per answer."""
    bootstrap_samples: int = Field(2000, ge=100)
    """Bootstrap resamples of the problems per interval; every metric of a set shares them. Time and
    memory grow linearly (2000 x 720 problems: ~0.1 s and ~12 MB per set)."""
    interval_level: float = Field(0.95, gt=0.5, lt=1.0)
    """Coverage of the percentile intervals."""
    resampling: Resampling = "problems"
    """How seeds are pooled in the bootstrap (see stages/common/stats.py); one evaluate run holds one
    seed, so this matters only to callers that pool runs."""
    transcripts: int = Field(6, ge=0)
    """Problems per set whose multi-turn transcripts (every model, every condition) go into the report."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.num_samples < self.max_turns:
            raise ValueError(f"num_samples: {self.num_samples} must be >= max_turns ({self.max_turns}) "
                             "to estimate Pass@k for every k <= T")
        if len(set(self.inference)) != len(self.inference):
            raise ValueError(f"inference: {self.inference} lists a condition twice")
        for name in self.models:
            if name in ("base", "sft", "rl"):
                raise ValueError(f"models.{name}: the name is taken by the pipeline's own {name} model")
            if not _NAME.fullmatch(name) or name.endswith("_no_feedback") or "_vs_" in name:
                raise ValueError(f"models.{name}: a name is letters, digits, '_', '.', '-' (and neither ends "
                                 "with '_no_feedback' nor holds '_vs_', which the metric names use)")
        return self
