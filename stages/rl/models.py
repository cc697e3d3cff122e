"""What the RL trainer trains and how it runs a forward pass: policy, critic, reference, and the engines
that train them.

`build_models` is the one place they are constructed. The policy and the critic each train through a
`stages.common.engine` engine, the same ones SFT uses: plain torch in this process, or DeepSpeed ZeRO-2/3
on one of the ranks the stage launched; the policy optionally as LoRA adapters through peft, in which case
the KL reference is the same model with its adapter disabled (no second copy of the weights). The trainer
calls `score`/`critic_values` on `Models.policy`/`Models.critic` (the engines' modules: forward goes
through DeepSpeed, which gathers ZeRO-3's partitioned weights), `backward` on the engines, and `step`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from stages.common.engine import TrainEngine, build_engine
from stages.common.model import load_pretrained, selected_logits
from stages.rl.batch import Batch
from stages.rl.config import Config
from stages.rl.losses import entropy_from_logits


class ValueModel(nn.Module):
    """A critic: a decoder trunk and a scalar head reading its last hidden state, one value per position.

    `trunk` is None for a value head on the policy (the policy's hidden states are passed in); else a
    copy of the SFT model's decoder. The head starts at zero: initial values are 0 and building it
    draws no random numbers, so PPO and GRPO runs with one seed sample the same first rollouts.
    """

    def __init__(self, hidden_size: int, trunk: nn.Module | None = None):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """[B, W] values from the trunk run on input_ids, or from given hidden states [B, W, H]."""
        if hidden is None:
            hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, W, H]
        # the head's own dtype (DeepSpeed bf16 casts it with the trunk), values in float32 for the losses
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # [B, W]


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DeepSpeed engine (which keeps it as `.module`), else `model` itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def hf_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under DeepSpeed and peft wrappers (peft's LoRA layers live inside it, so
    calling it or its decoder still applies the adapters)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class Models:
    """policy_engine/critic_engine train; `reference` is a frozen copy of the SFT policy, or None (no KL,
    or LoRA: the policy with its adapter disabled is the reference, see `reference_model`)."""

    policy_engine: TrainEngine
    critic_engine: TrainEngine | None
    tokenizer: object
    reference: nn.Module | None
    adapter_reference: bool = False
    """LoRA with kl_coef > 0: the reference is the policy with its adapter disabled."""

    @property
    def policy(self) -> nn.Module:
        """What the policy's forward is called on (the DeepSpeed engine, or the (peft) model itself)."""
        return self.policy_engine.module

    @property
    def hf_policy(self) -> nn.Module:
        """The (peft-wrapped) transformers model: `generate`, config, export."""
        return self.policy_engine.hf_model

    @property
    def critic(self) -> nn.Module | None:
        return self.critic_engine.module if self.critic_engine is not None else None

    @property
    def shared_critic(self) -> bool:
        """A value head on the policy's own decoder (no trunk of its own)."""
        return self.critic is not None and unwrap(self.critic).trunk is None

    @property
    def value_prefix_model(self) -> nn.Module:
        """Whose prefix keys/values the critic's values need: the policy's for a value head on it."""
        return self.policy if self.shared_critic else self.critic

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.adapter_reference

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The module that scores as the frozen SFT reference: a copy, or the LoRA policy with its adapter
        disabled (peft's `disable_adapter`: base weights exactly, the adapters skipped)."""
        if self.reference is not None:
            yield self.reference
        elif self.adapter_reference:
            with self.hf_policy.disable_adapter():
                yield self.policy
        else:
            raise RuntimeError("no reference model: kl_coef is 0")

    @property
    def engines(self) -> list[TrainEngine]:
        return [e for e in (self.policy_engine, self.critic_engine) if e is not None]

    def train(self, mode: bool = True) -> None:
        for engine in self.engines:
            engine.module.train(mode)

    def expect_backwards(self, count: int) -> None:
        for engine in self.engines:
            engine.expect_backwards(count)

    def backward(self, actor: torch.Tensor, critic: torch.Tensor | None) -> None:
        """Backward of the actor loss through the policy's engine and of the (weighted) value loss through
        the critic's. A value head's loss also reaches the policy's decoder (its hidden states), so the two
        go back in one pass; the config allows that only with torch engines, where the gradients land in
        each module's own parameters whichever engine calls backward."""
        if critic is None:
            self.policy_engine.backward(actor)
        elif self.shared_critic:
            self.policy_engine.backward(actor + critic)
        else:
            self.policy_engine.backward(actor)
            self.critic_engine.backward(critic)

    def step(self) -> dict[str, float]:
        """Clip each model's gradient norm (over all ranks) and take one optimizer step; return the norms."""
        norms = {"loss/grad_norm": self.policy_engine.step()}
        if self.critic_engine is not None:
            norms["loss/critic_grad_norm"] = self.critic_engine.step()
        return norms


def _constant(_step: int) -> float:
    return 1.0


def build_models(cfg: Config, model_dir: str | Path, device: torch.device) -> Models:
    """Policy (the SFT model), reference (when kl_coef > 0), critic (PPO), each in its engine.

    Copies are taken before any engine wraps a model (DeepSpeed partitions ZeRO-3 weights in place, peft
    injects adapters in place). The reference is a plain frozen module on every rank (replicated, not
    partitioned); with LoRA there is none: the base weights ARE the reference. The critic trains all its
    weights (LoRA applies to the policy only), with the policy's engine kind.
    """
    policy, tokenizer = load_pretrained(model_dir, device)
    lora = cfg.engine.lora is not None
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 and not lora else None
    critic = None
    if cfg.algorithm == "ppo":
        hidden = policy.get_output_embeddings().in_features
        trunk = copy.deepcopy(policy.base_model) if cfg.critic == "separate" else None
        critic = ValueModel(hidden, trunk).to(device)
    common = {"weight_decay": 0.0, "grad_clip": cfg.grad_clip, "lr_lambda": _constant}
    policy_engine = build_engine(policy, cfg.engine, lr=cfg.lr, **common)
    critic_engine = None
    if critic is not None:
        # A value head has no weights worth sharding: it trains in this process, next to the policy.
        spec = cfg.engine.model_copy(update={"lora": None})
        if critic.trunk is None:
            spec = spec.model_copy(update={"kind": "torch", "num_processes": 1, "nodes": 1})
        critic_engine = build_engine(critic, spec, lr=cfg.critic_lr, **common)
    return Models(policy_engine, critic_engine, tokenizer, reference, adapter_reference=lora and cfg.kl_coef > 0)


@dataclass
class Scores:
    """One forward pass over a (micro-)batch, at the positions that predict a next token.

    logprobs: [B, L] of the episode's own next tokens under logits / temperature (0 where not generated);
    entropy: [B, L] or None; values: [B, L] or None.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None


# --- forward passes, with or without a shared prefix ------------------------------------------------

#: Per decoder layer, the (keys, values) of every distinct prefix: [U, heads, P, head_dim] each.
PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack under a causal LM head (or the critic's trunk): what runs the prefixes."""
    inner = unwrap(model)
    return inner.trunk if isinstance(inner, ValueModel) else hf_model_of(inner).base_model


def supports_shared_prefix(model: nn.Module) -> bool:
    """Full attention in every layer: a sliding-window layer would see a prefix it must not."""
    config = hf_model_of(model).config
    return all(t == "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]) \
        and not getattr(config, "use_sliding_window", False)


def _transformers_module(model: nn.Module) -> nn.Module:
    """The transformers model (or the critic's trunk) whose forward and config a forward call reaches."""
    inner = unwrap(model)
    return inner.trunk if isinstance(inner, ValueModel) else hf_model_of(inner)


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40)
    forward = _transformers_module(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def prefix_kv(model: nn.Module, batch: Batch) -> PrefixKV:
    """Run every distinct prefix of `batch` through `model`'s decoder once; return its keys/values."""
    out = decoder_of(model)(input_ids=batch.prefix_ids.to(_device(model)),
                            attention_mask=batch.prefix_mask.to(_device(model)), use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return [(k, v) for k, v, *_ in cache]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def gather_prefix(kv: PrefixKV, group: torch.Tensor) -> PrefixKV:
    """Each episode's copy of its prefix's keys/values: [U, h, P, d] -> [b, h, P, d] per layer, by `group` [b].

    `index_select`, not `k[group]`: the two give the same values, but the backward of advanced indexing is
    `index_put_(accumulate=True)`, which on CPU with several threads adds a prefix's episode gradients with
    atomic float adds in whatever order the threads get there, so the last bits of every gradient followed
    thread timing (a busy machine changed step 1's grad norm in the 8th digit). `index_select`'s backward
    (`index_add_`) adds them in index order on CPU; on CUDA it uses atomics too unless
    `torch.use_deterministic_algorithms(True)` (README.md). Cost: benchmarks/prefix_gather.py.
    """
    return [(k.index_select(0, group), v.index_select(0, group)) for k, v in kv]


def _suffix_inputs(model: nn.Module, mb: Batch, kv: PrefixKV | None) -> dict:
    """Forward kwargs for the suffixes of `mb`: alone, or after their prefixes' cached keys/values."""
    if kv is None:
        return {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask}
    group = mb.group.to(mb.input_ids.device)
    config = _transformers_module(model).config
    cache = DynamicCache(ddp_cache_data=gather_prefix(kv, group), config=config)  # [b, h, P, d]
    width = mb.input_ids.shape[1]
    positions = mb.prefix_lens[:, None].to(group.device) + torch.arange(width, device=group.device)  # [b, W]
    return {"input_ids": mb.input_ids, _cache_kwarg(model): cache, "position_ids": positions,
            "attention_mask": torch.cat([mb.prefix_mask.to(group.device)[group], mb.attention_mask], dim=1)}


def score(model: nn.Module, mb: Batch, temperature: float, *, entropy: bool = False,
          value_head: ValueModel | None = None, kv: PrefixKV | None = None) -> Scores:
    """Log-probs (and the entropy, and a shared value head's values) of the sampled tokens of `mb`.

    `kv`: the prefixes' keys/values from `prefix_kv(model, ...)` when the batch shares prefixes.
    Log-softmax runs only at generated positions: at T = 5 most positions are question, feedback or
    padding, and a log-softmax over [B, L, V] would be mostly thrown away.
    """
    where = mb.response_mask.bool()  # [B, L]
    vals = None
    if value_head is None:  # the head on the generated positions only
        logits = selected_logits(model, _suffix_inputs(model, mb, kv), where).float() / temperature  # [N, V]
    else:
        out = model(**_suffix_inputs(model, mb, kv), output_hidden_states=True, use_cache=False)
        logits = out.logits[:, :-1][where].float() / temperature  # [N, V]
        vals = value_head(hidden=out.hidden_states[-1])[:, :-1]  # [B, L]
    targets = mb.input_ids[:, 1:][where]  # [N]
    logprobs = torch.zeros(where.shape, dtype=torch.float32, device=logits.device)  # [B, L]
    logprobs[where] = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    ent = None
    if entropy:
        ent = torch.zeros_like(logprobs)  # [B, L]
        ent[where] = entropy_from_logits(logits)
    return Scores(logprobs, ent, vals)


def critic_values(models: Models, mb: Batch, kv: PrefixKV | None = None) -> torch.Tensor:
    """[B, L] the critic's value of each position's state (a separate critic runs alone, after its own
    prefix keys/values `kv`; a value head needs the policy's hidden states, after the policy's `kv`)."""
    if models.shared_critic:
        hidden = models.policy(**_suffix_inputs(models.policy, mb, kv), output_hidden_states=True,
                               use_cache=False).hidden_states[-1]  # [B, W, H]
        return models.critic(hidden=hidden)[:, :-1]
    trunk = unwrap(models.critic).trunk
    hidden = trunk(**_suffix_inputs(trunk, mb, kv), use_cache=False).last_hidden_state  # [B, W, H]
    return models.critic(hidden=hidden)[:, :-1]
