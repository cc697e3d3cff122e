"""The RL trainer (see stages/rl/__init__.py): rollout -> reward -> advantage -> update -> log."""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass

import mlflow
import torch

from stages.common.chat import ChatFormat
from stages.common.config import ConfigError
from stages.common.contracts import load_split, problems_from
from stages.common.episodes import Episode, rollout
from stages.common.metrics import episode_metrics
from stages.common.model import load_pretrained, resolve_device, save_pretrained, seed_everything
from stages.common.runtime import set_cpu_threads
from stages.common.tracking import StageContext, fetch_verified, log_artifact
from stages.rl.config import Config, Output
from stages.rl.losses import group_advantages, grpo_loss, token_logprobs
from stages.rl.rewards import episode_return

log = logging.getLogger("ufo.rl")


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


def train(config: Config, ctx: StageContext) -> Output:
    if config.data is None or config.sft is None:
        raise ConfigError("rl.data and rl.sft: the curate and SFT stages' Outputs are required (the flow sets them)")
    set_cpu_threads()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_df = load_split(fetch_verified(config.data.artifact("train"), ctx.workdir / "in"))
    model_dir = fetch_verified(config.sft.artifact("model"), ctx.workdir / "in")
    policy, tokenizer = load_pretrained(model_dir, device)
    fmt = ChatFormat(tokenizer, config.feedback)
    problems = problems_from(train_df)
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
    model_ref = log_artifact(save_pretrained(policy, tokenizer, ctx.workdir / "model"), "model")
    return Output(run_id=ctx.run_id, artifacts={"model": model_ref}, metrics=summary)


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
