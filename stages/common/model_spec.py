"""What model a stage trains or loads, as typed config. No torch here: the CLI validates configs
with it before anything heavy is imported; `stages/common/model.py` builds and loads the models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import StrictModel

Device = Literal["auto", "cpu", "cuda"]


class ModelConfig(StrictModel):
    """Which policy to start from. Tiny scratch model by default; `pretrained` for real models."""

    init: Literal["scratch", "pretrained"] = "scratch"
    """`scratch`: a new Llama-style model with a locally built character tokenizer. `pretrained`:
    load `name_or_path` (model + tokenizer + chat template) with `from_pretrained`."""
    name_or_path: str | None = None
    """Local folder or hub id; required when init=pretrained (hub ids need network access)."""
    hidden_size: int = Field(128, ge=8)
    """Width of the scratch model. Cost grows ~quadratically: 128 -> 0.53M params, ~8 SFT steps/s on 2 cores."""
    num_layers: int = Field(2, ge=1)
    """Decoder layers of the scratch model; time and memory grow linearly."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the scratch model; must divide hidden_size."""
    intermediate_size: int = Field(512, ge=8)
    """MLP width of the scratch model."""
    max_position_embeddings: int = Field(160, ge=16)
    """Context length of the scratch model, in tokens. Must hold the prompt plus every turn of an episode."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("name_or_path: required when init is 'pretrained'")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} must divide hidden_size ({self.hidden_size})")
        return self
