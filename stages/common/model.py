"""Model construction, loading, saving and the compute device: one place for every stage.

Three kinds of start (`ModelConfig.init`): the tiny default, a Llama-style decoder with a character
tokenizer, trained from scratch; the tiny chat model, a Qwen2-architecture decoder with a locally
trained BPE tokenizer and a ChatML template, also from scratch (no download either); and any pretrained
causal LM (a local folder, a hub id where a hub is reachable, or a GGUF file), imported once into MLflow
by `stages/common/base_model.py` and loaded from that copy with `from_pretrained`, always from
safetensors and without remote code unless the config allows it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from stages.common.chat import build_char_tokenizer, build_chatml_bpe_tokenizer
from stages.common.config import ConfigError
from stages.common.model_spec import Device, ModelConfig


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


def _finish(model, tokenizer):
    """Generation defaults every stage relies on: stop at the tokenizer's eos, pad with its pad token."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _decoder_config(config_cls, cfg: ModelConfig, tokenizer):
    """A transformers decoder config sized by `cfg`, with tied input/output embeddings."""
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )


def new_scratch_model(cfg: ModelConfig, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised Llama-style decoder sized by `cfg`, with tied input/output embeddings."""
    return _finish(LlamaForCausalLM(_decoder_config(LlamaConfig, cfg, tokenizer)), tokenizer)


def new_chat_model(cfg: ModelConfig, tokenizer) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2-architecture decoder (Qwen2.5's code path: GQA, q/k/v biases, RoPE)
    sized by `cfg`, with tied embeddings as the small Qwen2.5 models have."""
    return _finish(Qwen2ForCausalLM(_decoder_config(Qwen2Config, cfg, tokenizer)), tokenizer)


def build_model(cfg: ModelConfig, texts: list[str], feedback: str, device: torch.device,
                base_dir: str | Path | None = None):
    """The model + tokenizer a training stage starts from, as `cfg.init` says.

    Args:
        texts: the curated training texts (questions and answers) the scratch tokenizers are built from.
        feedback: the unary feedback text (one token of the char tokenizer; ordinary BPE text otherwise).
        base_dir: a pretrained start's imported copy (`base_model.import_base_model`); required then.
    Returns:
        (model on `device`, tokenizer with its chat template).
    """
    if cfg.init == "scratch":
        tokenizer = build_char_tokenizer(texts, feedback)
        model = new_scratch_model(cfg, tokenizer)
    elif cfg.init == "scratch_chat":
        tokenizer = build_chatml_bpe_tokenizer([*texts, feedback], cfg.bpe_vocab_size)
        model = new_chat_model(cfg, tokenizer)
    else:
        if base_dir is None:
            raise ValueError("build_model: a pretrained start loads from its imported copy (base_dir)")
        # The import already applied dtype and chat template; the hub-only options do not apply to a folder.
        return load_pretrained(base_dir, device, cfg.model_copy(update={"name_or_path": str(base_dir),
                                                                        "init": "pretrained", "gguf": None,
                                                                        "revision": None}))
    model = model.to(device=device, dtype=getattr(torch, cfg.dtype))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def checkpoint_dirs(folder: str | Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a downloaded model: a `save_pretrained` folder, or an MLflow
    transformers model (MLmodel + `model/` + `components/tokenizer/`). Anything else (a hub id) is
    returned as it is, for `from_pretrained` to resolve."""
    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("transformers")
        if flavor is None:
            raise ConfigError(f"{folder}: an MLflow model without the transformers flavour; log it with "
                              "mlflow.transformers.log_model")
        if "model_binary" not in flavor:
            raise ConfigError(f"{folder}: logged with save_pretrained=False, so it holds no weights, only a "
                              f"reference to {flavor.get('source_model_name')!r}; evaluate that checkpoint")
        model_dir = folder / flavor["model_binary"]
        tokenizer_dir = folder / "components" / "tokenizer"
        return model_dir, tokenizer_dir if tokenizer_dir.is_dir() else model_dir
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: not a transformers checkpoint (neither an MLmodel file nor config.json)")
    return folder, folder


def load_tokenizer(path: str | Path, cfg: ModelConfig | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token and the chat template `cfg` asks for (else its own)."""
    kwargs = {} if cfg is None else {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dirs(path)[1]), **kwargs)
    if cfg is not None and cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; set model.chat_template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(path: str | Path, device: torch.device, cfg: ModelConfig | None = None):
    """Model + tokenizer from a `save_pretrained` folder (ours, or a hub model's local copy), an MLflow
    transformers model's folder, or a hub id.

    Weights come from safetensors only (`use_safetensors=True`: a folder with only pickled weights is
    refused rather than unpickled) and no remote code runs unless `cfg.trust_remote_code`. Without `cfg`
    (a stage loading an upstream artifact) the model loads in float32 with sdpa attention.
    """
    cfg = cfg or ModelConfig(init="pretrained", name_or_path=str(path))
    tokenizer = load_tokenizer(path, cfg)
    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint_dirs(path)[0]), revision=cfg.revision, dtype=getattr(torch, cfg.dtype), use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
    ).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return _finish(model, tokenizer), tokenizer


def save_pretrained(model, tokenizer, path: str | Path) -> Path:
    """A folder plain transformers loads: config, safetensors weights, tokenizer and chat template."""
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def context_length(model) -> int:
    return int(model.config.max_position_embeddings)


#: Causal LMs whose logits are exactly `lm_head(last_hidden_state)` (no soft-capping or scaling after the
#: head): for them `selected_logits` may run the head on the positions it needs only.
PLAIN_HEAD_MODELS = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"})


def _decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) of a plain-head causal LM, also under a peft wrapper (its LoRA layers live inside
    the decoder); None for anything else, DeepSpeed engines included (their forward must go through the
    engine)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, torch.nn.Module):  # a DeepSpeed engine
        return None
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(hf).__name__ not in PLAIN_HEAD_MODELS:
        return None
    return hf.get_decoder(), hf.get_output_embeddings()


#: The output head's share of a model's weights below which `selected_logits` keeps the plain forward:
#: there the head costs next to nothing (the tiny default's is 0.3% of its weights), and the plain
#: forward keeps the float order, so such models train exactly as they did before the selection existed
#: (the tiny default's SFT otherwise stops at another step: same per-step time, a different trajectory).
MIN_HEAD_SHARE = 0.05


def head_share(model) -> float:
    """The output head's share of a plain-head model's weights (0 for anything `selected_logits` cannot
    split); a tied head counts once, as its weights are stored once."""
    parts = _decoder_and_head(model)
    return 0.0 if parts is None else _head_share(*parts)


def _head_share(decoder: torch.nn.Module, head: torch.nn.Module) -> float:
    return head.weight.numel() / (head.weight.numel() + sum(p.numel() for p in decoder.parameters()
                                                            if p is not head.weight))


def selected_logits(model, inputs: dict[str, torch.Tensor], where: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the positions `where` [B, W-1] marks (position j predicts token j+1) of a forward
    over `inputs` (input_ids [B, W] and attention or position ids, or a cache).

    Only the decoder runs on every position; the output head (vocabulary x hidden, 21% of SmolLM2-135M's
    weights) and the softmax run on the N selected positions: the answer tokens, a tenth of an SFT
    example and less of an RL episode. Same numbers as `model(**inputs).logits[:, :-1][where]` up to
    float rounding; models with anything after the head, or whose head is under `MIN_HEAD_SHARE` of
    their weights, take that plain forward.
    """
    parts = _decoder_and_head(model)
    if parts is None or _head_share(*parts) < MIN_HEAD_SHARE:
        return model(**inputs, use_cache=False).logits[:, :-1][where]
    decoder, head = parts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][where]  # [N, H]
    return head(hidden)
