"""Model construction, loading, saving and the compute device: one place for every stage.

The tiny default is a Llama-style decoder trained from scratch (no download). `init: pretrained`
loads any causal LM with `from_pretrained` (a local folder or a hub id where a hub is reachable):
the same code path real Qwen2.5 runs take.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA device is visible")
    return torch.device(device)


def set_cpu_threads() -> None:
    # Torch defaults to all cores; leave it, but let UFO_THREADS pin it (e.g. two stages side by side).
    if n := os.environ.get("UFO_THREADS"):
        torch.set_num_threads(int(n))


def new_scratch_model(cfg: ModelConfig, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised Llama-style decoder sized by `cfg`, with tied input/output embeddings."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_pretrained(path: str | Path, device: torch.device):
    """Model + tokenizer saved by `save_pretrained` (ours, or a hub model's local copy)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    return model, tokenizer


def save_pretrained(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def context_length(model) -> int:
    return int(model.config.max_position_embeddings)
