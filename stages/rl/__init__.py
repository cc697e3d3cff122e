"""Multi-turn RL with unary feedback (UFO, arXiv 2507.14295), GRPO flavour.

Each step: sample problems -> play group_size episodes per problem (answer, "Let's try again." on a
wrong answer, up to max_turns) -> episode returns gamma**t - lambda*(1 - E/T) -> group-normalised
advantages -> PPO-clipped update with a KL term to the SFT reference -> log -> (at the end) checkpoint.
The update trains on exactly the sampled token ids; only generated tokens carry loss.

Launch: python -m stages.rl --config rl.yaml   (its `sft` and `data` fields hold upstream Outputs)
"""

from __future__ import annotations

import copy
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
import torch
from pydantic import Field, model_validator

from stages.common.chat import ChatFormat
from stages.common.config import ConfigError, StageConfig
from stages.common.episodes import Episode, rollout
from stages.common.metrics import episode_metrics
from stages.common.model import (
    Device,
    load_pretrained,
    resolve_device,
    save_pretrained,
    seed_everything,
    set_cpu_threads,
)
from stages.common.tracking import StageOutput, fetch_verified, log_artifact, stage_run
from stages.curate import Output as CurateOutput
from stages.curate import load_split
from stages.rl.losses import group_advantages, grpo_loss, token_logprobs
from stages.rl.rewards import episode_return
from stages.sft import DEFAULT_FEEDBACK, problems_from
from stages.sft import Output as SFTOutput

log = logging.getLogger("ufo.rl")


class Config(StageConfig):
    device: Device = "auto"
    """auto = cuda when visible, else cpu."""
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow)."""
    sft: SFTOutput | None = None
    """The SFT stage's Output: the starting policy and the KL reference (set by the flow)."""
    algorithm: Literal["grpo"] = "grpo"
    """Policy-gradient estimator. GRPO: group-normalised episode returns, no critic."""
    max_turns: int = Field(5, ge=1)
    """T: most answers per episode (paper: 5). Rollout time grows with it."""
    gamma: float = Field(0.5, gt=0, le=1)
    """γ: a correct answer at 0-based turn t earns γ**t (paper: 0.5)."""
    repetition_penalty: float = Field(0.5, ge=0)
    """λ: at episode end, subtract λ·(1 − E/T), E distinct valid answers of the T given (paper: 0.5)."""
    feedback: str = DEFAULT_FEEDBACK
    """The unary feedback appended as the next user turn after a wrong answer."""
    steps: int = Field(130, ge=1)
    """Policy updates (rollout + update). ~0.9 s each for the tiny default on 2 cores."""
    problems_per_step: int = Field(32, ge=1)
    """Problems sampled per step (paper: 8)."""
    group_size: int = Field(8, ge=2)
    """Episodes per problem; advantages are normalised within each group (paper: 16)."""
    minibatch_size: int = Field(256, ge=1)
    """Episodes per gradient step; must divide problems_per_step * group_size."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout batch. 1 = on-policy (ratio starts at 1)."""
    lr: float = Field(2e-4, gt=0)
    """AdamW learning rate. For the tiny default >= 5e-4 lets the policy game the repetition penalty."""
    clip_low: float = Field(0.2, gt=0, lt=1)
    """PPO ratio clip below 1 (paper: 0.2)."""
    clip_high: float = Field(0.28, gt=0)
    """PPO ratio clip above 1 (paper: 0.28, "clip-higher")."""
    kl_coef: float = Field(0.01, ge=0)
    """Weight of the k3 KL estimate to the frozen SFT reference (paper: 0.001). 0 skips the reference model."""
    scale_advantages: bool = True
    """Divide group-centred returns by the group std (GRPO); False only centres them (Dr. GRPO)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts; log-probs in the loss use the same temperature."""
    max_new_tokens: int = Field(8, ge=1)
    """Most tokens per answer. An answer cut off here gets no eos and is usually invalid."""
    max_prompt_tokens: int = Field(32, ge=1)
    """Longest question prompt allowed, in tokens (longer prompts are an error naming the row)."""
    max_feedback_tokens: int = Field(8, ge=1)
    """Upper bound on the template tokens of one feedback turn (4 with the tiny tokenizer, ~15 with Qwen's)."""
    grad_clip: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Config:
        batch = self.problems_per_step * self.group_size
        if batch % self.minibatch_size:
            raise ValueError(f"minibatch_size: {self.minibatch_size} must divide problems_per_step * group_size "
                             f"({self.problems_per_step} * {self.group_size} = {batch})")
        if self.clip_low >= 1:
            raise ValueError("clip_low: must be < 1")
        return self

    @property
    def max_episode_tokens(self) -> int:
        """Worst-case episode length: prompt + T answers + (T-1) feedback turns (+1 closing eos each)."""
        return self.max_prompt_tokens + self.max_turns * (self.max_new_tokens + 1) \
            + (self.max_turns - 1) * self.max_feedback_tokens


class Output(StageOutput):
    stage: str = "rl"


@dataclass
class Batch:
    """Episodes as right-padded tensors.

    input_ids: [B, L+1] episode token ids; attention_mask: [B, L+1];
    response_mask: [B, L] 1 where token j+1 was sampled by the policy (aligned with logprobs);
    advantages: [B] one per episode.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor

    def __getitem__(self, idx: torch.Tensor) -> Batch:
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx], self.advantages[idx])


def collate(episodes: list[Episode], advantages: torch.Tensor, pad_id: int, device: torch.device) -> Batch:
    """Pack episodes exactly as they were played: same ids, mask on the generated ones."""
    seqs = [e.token_ids() for e in episodes]
    masks = [e.response_mask() for e in episodes]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, L+1]
    attn = torch.zeros_like(ids)  # [B, L+1]
    resp = torch.zeros_like(ids)  # [B, L+1]
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, : len(m)] = torch.tensor(m)
    return Batch(ids.to(device), attn.to(device), resp[:, 1:].to(device), advantages.to(device))


def sequence_logprobs(model, batch: Batch, temperature: float) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, L+1, V]
    return token_logprobs(logits, batch.input_ids, temperature)  # [B, L]


def episode_returns(episodes: list[Episode], cfg: Config) -> torch.Tensor:
    """[B] returns in rollout order (grouped by problem)."""
    return torch.tensor([
        episode_return(e.solved_turn, e.num_distinct, e.num_turns, cfg.gamma, cfg.repetition_penalty)
        for e in episodes
    ])


def run(config: Config, parent_run_id: str | None = None) -> Output:
    if config.data is None or config.sft is None:
        raise ConfigError("rl.data and rl.sft: the curate and SFT stages' Outputs are required (the flow sets them)")
    set_cpu_threads()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    with stage_run("rl", config, config.experiment, parent_run_id) as run_, tempfile.TemporaryDirectory() as tmp:
        train = load_split(fetch_verified(config.data.artifact("train"), Path(tmp) / "in"))
        model_dir = fetch_verified(config.sft.artifact("model"), Path(tmp) / "in")
        policy, tokenizer = load_pretrained(model_dir, device)
        fmt = ChatFormat(tokenizer, config.feedback)
        problems = problems_from(train)
        _check_lengths(config, fmt, problems, policy)
        reference = None
        if config.kl_coef > 0:
            reference = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
        rng = random.Random(config.seed)
        t_start = time.time()
        for step in range(1, config.steps + 1):
            t0 = time.time()
            # 1. rollout
            policy.eval()
            step_problems = rng.sample(problems, config.problems_per_step)
            episodes = rollout(policy, fmt, step_problems, group_size=config.group_size, max_turns=config.max_turns,
                               temperature=config.temperature, max_new_tokens=config.max_new_tokens)
            t_rollout = time.time() - t0
            # 2. reward, 3. advantage
            returns = episode_returns(episodes, config)  # [P*G]
            advantages = group_advantages(returns.view(config.problems_per_step, config.group_size),
                                          scale=config.scale_advantages).flatten()  # [P*G]
            batch = collate(episodes, advantages, fmt.pad_id, device)
            with torch.no_grad():
                old_logprobs = sequence_logprobs(policy, batch, config.temperature)  # [B, L]
                ref_logprobs = sequence_logprobs(reference, batch, config.temperature) if reference else None
            # 4. update
            policy.train()
            stats: dict[str, float] = {}
            order = torch.randperm(len(episodes))
            for _epoch in range(config.ppo_epochs):
                for start in range(0, len(episodes), config.minibatch_size):
                    idx = order[start:start + config.minibatch_size]
                    mb = batch[idx]
                    logprobs = sequence_logprobs(policy, mb, config.temperature)
                    loss, mb_stats = grpo_loss(
                        logprobs, old_logprobs[idx], None if ref_logprobs is None else ref_logprobs[idx],
                        mb.advantages, mb.response_mask, clip_low=config.clip_low, clip_high=config.clip_high,
                        kl_coef=config.kl_coef)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
                    opt.step()
                    stats = {k: float(v) for k, v in mb_stats.items()} | {"loss/grad_norm": float(grad_norm)}
            # 5. log
            metrics = {f"rollout/{k}": v for k, v in episode_metrics(episodes, config.max_turns).items()}
            metrics |= {
                "rollout/reward_mean": float(returns.mean()),
                "rollout/reward_std": float(returns.std()),
                "rollout/generated_tokens": float(batch.response_mask.sum()),
                "perf/step_seconds": time.time() - t0,
                "perf/rollout_seconds": t_rollout,
                "perf/episodes_per_second": len(episodes) / t_rollout,
            } | stats
            mlflow.log_metrics(metrics, step=step)
            if step % 10 == 0 or step == 1:
                log.info("step %d reward %.3f succ@1 %.3f succ@%d %.3f kl %.4f (%.2fs)", step,
                         metrics["rollout/reward_mean"], metrics["rollout/succ_at_1"], config.max_turns,
                         metrics[f"rollout/succ_at_{config.max_turns}"], metrics["loss/kl"], metrics["perf/step_seconds"])
        # 6. checkpoint
        summary = {"rl/steps": float(config.steps), "perf/train_seconds": time.time() - t_start}
        mlflow.log_metrics(summary)
        model_ref = log_artifact(save_pretrained(policy, tokenizer, Path(tmp) / "model"), "model")
        return Output(run_id=run_.info.run_id, artifacts={"model": model_ref}, metrics=summary)


def _check_lengths(cfg: Config, fmt: ChatFormat, problems, model) -> None:
    """Fail early, naming the field or row, rather than truncate an episode mid-training."""
    if len(fmt.feedback_ids) > cfg.max_feedback_tokens:
        raise ConfigError(f"rl.max_feedback_tokens: the feedback turn takes {len(fmt.feedback_ids)} tokens "
                          f"with this tokenizer, more than {cfg.max_feedback_tokens}")
    for p in problems:
        if len(fmt.prompt_ids(p.question)) > cfg.max_prompt_tokens:
            raise ConfigError(f"rl.max_prompt_tokens: row {p.id} has a {len(fmt.prompt_ids(p.question))}-token "
                              f"prompt, more than {cfg.max_prompt_tokens}")
    limit = int(model.config.max_position_embeddings)
    if cfg.max_episode_tokens > limit:
        raise ConfigError(f"rl.max_turns: an episode can take {cfg.max_episode_tokens} tokens, more than the "
                          f"model's {limit} positions")
