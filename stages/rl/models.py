"""What the RL trainer trains and how it runs a forward pass: policy, critic, reference, optimizers.

`build_models` is the one place they are constructed. A DeepSpeed engine or a peft/LoRA policy plugs
in there (wrap `policy`/`critic` and their optimizers; make `reference` the base with the adapter
disabled); the trainer only calls `score`, `.backward()` on a loss and `step`.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from stages.common.model import load_pretrained
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
        return self.head(hidden.float()).squeeze(-1)  # [B, W]


@dataclass
class Models:
    policy: nn.Module
    tokenizer: object
    reference: nn.Module | None
    critic: ValueModel | None
    policy_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None

    @property
    def shared_critic(self) -> bool:
        """A value head on the policy's own decoder (no trunk of its own)."""
        return self.critic is not None and self.critic.trunk is None

    @property
    def value_prefix_model(self) -> nn.Module:
        """Whose prefix keys/values the critic's values need: the policy's for a value head on it."""
        return self.policy if self.shared_critic else self.critic

    def train(self, mode: bool = True) -> None:
        self.policy.train(mode)
        if self.critic is not None:
            self.critic.train(mode)

    def zero_grad(self) -> None:
        self.policy_optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    def step(self, grad_clip: float) -> dict[str, float]:
        """Clip each model's gradient norm and take one optimizer step; return the norms."""
        norms = {"loss/grad_norm": float(nn.utils.clip_grad_norm_(self.policy.parameters(), grad_clip))}
        self.policy_optimizer.step()
        if self.critic_optimizer is not None:
            norms["loss/critic_grad_norm"] = float(nn.utils.clip_grad_norm_(self.critic.parameters(), grad_clip))
            self.critic_optimizer.step()
        return norms


def build_models(cfg: Config, model_dir: str | Path, device: torch.device) -> Models:
    """Policy (the SFT model), reference (a frozen copy, when kl_coef > 0), critic (PPO) and optimizers.

    The seam for DeepSpeed/LoRA: swap what is built here; everything downstream sees `Models`.
    """
    policy, tokenizer = load_pretrained(model_dir, device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    critic = None
    critic_optimizer = None
    if cfg.algorithm == "ppo":
        hidden = policy.get_output_embeddings().in_features
        trunk = copy.deepcopy(policy.base_model) if cfg.critic == "separate" else None
        critic = ValueModel(hidden, trunk).to(device)
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)
    policy_optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    return Models(policy, tokenizer, reference, critic, policy_optimizer, critic_optimizer)


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
    return model.trunk if isinstance(model, ValueModel) else model.base_model


def supports_shared_prefix(model: nn.Module) -> bool:
    """Full attention in every layer: a sliding-window layer would see a prefix it must not."""
    config = model.config
    return all(t == "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]) \
        and not getattr(config, "use_sliding_window", False)


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_kv(model: nn.Module, batch: Batch) -> PrefixKV:
    """Run every distinct prefix of `batch` through `model`'s decoder once; return its keys/values."""
    out = decoder_of(model)(input_ids=batch.prefix_ids.to(_device(model)),
                            attention_mask=batch.prefix_mask.to(_device(model)), use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return [(k, v) for k, v, *_ in cache]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _suffix_inputs(model: nn.Module, mb: Batch, kv: PrefixKV | None) -> dict:
    """Forward kwargs for the suffixes of `mb`: alone, or after their prefixes' cached keys/values."""
    if kv is None:
        return {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask}
    group = mb.group.to(mb.input_ids.device)
    cache = DynamicCache(ddp_cache_data=[(k[group], v[group]) for k, v in kv], config=model.config)  # [b, h, P, d]
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
    out = model(**_suffix_inputs(model, mb, kv), output_hidden_states=value_head is not None, use_cache=False)
    where = mb.response_mask.bool()  # [B, L]
    logits = out.logits[:, :-1][where].float() / temperature  # [N, V]
    targets = mb.input_ids[:, 1:][where]  # [N]
    logprobs = torch.zeros(where.shape, dtype=torch.float32, device=logits.device)  # [B, L]
    logprobs[where] = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    ent = None
    if entropy:
        ent = torch.zeros_like(logprobs)  # [B, L]
        ent[where] = entropy_from_logits(logits)
    vals = value_head(hidden=out.hidden_states[-1])[:, :-1] if value_head is not None else None  # [B, L]
    return Scores(logprobs, ent, vals)


def critic_values(models: Models, mb: Batch, kv: PrefixKV | None = None) -> torch.Tensor:
    """[B, L] the critic's value of each position's state (a separate critic runs alone, after its own
    prefix keys/values `kv`; a value head needs the policy's hidden states, after the policy's `kv`)."""
    if models.shared_critic:
        hidden = models.policy(**_suffix_inputs(models.policy, mb, kv), output_hidden_states=True,
                               use_cache=False).hidden_states[-1]  # [B, W, H]
        return models.critic(hidden=hidden)[:, :-1]
    trunk = models.critic.trunk
    hidden = trunk(**_suffix_inputs(trunk, mb, kv), use_cache=False).last_hidden_state  # [B, W, H]
    return models.critic(hidden=hidden)[:, :-1]
