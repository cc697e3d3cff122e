"""What the RL trainer trains and how it runs a forward pass: policy, critic, reference, optimizers.

`build_models` is the one place they are constructed. A DeepSpeed engine or a peft/LoRA policy plugs
in there (wrap `policy`/`critic` and their optimizers; make `reference` the base with the adapter
disabled); the trainer only calls `score`, `.backward()` on a loss and `step`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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


def score(model: nn.Module, mb: Batch, temperature: float, *, entropy: bool = False,
          value_head: ValueModel | None = None) -> Scores:
    """Log-probs (and the entropy, and a shared value head's values) of the sampled tokens of `mb`.

    Log-softmax runs only at generated positions: at T = 5 most positions are question, feedback or
    padding, and a log-softmax over [B, L, V] would be mostly thrown away.
    """
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, output_hidden_states=value_head is not None)
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


def critic_values(models: Models, mb: Batch) -> torch.Tensor:
    """[B, L] the critic's value of each position's state (a separate critic runs alone; a value head
    needs the policy's hidden states)."""
    if models.shared_critic:
        hidden = models.policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                               output_hidden_states=True).hidden_states[-1]  # [B, W, H]
        return models.critic(hidden=hidden)[:, :-1]
    return models.critic(input_ids=mb.input_ids, attention_mask=mb.attention_mask)[:, :-1]
