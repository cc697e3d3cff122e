"""The RL trainer (see stages/rl/__init__.py): rollout -> reward -> advantage -> update -> log -> checkpoint."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from transformers import AutoConfig

from stages.common.chat import ChatFormat
from stages.common.config import ConfigError
from stages.common.contracts import Problem, load_split, problems_from
from stages.common.episodes import Episode, rollout
from stages.common.metrics import episode_metrics
from stages.common.model import load_tokenizer, resolve_device, seed_everything
from stages.common.rank import run_on_ranks
from stages.common.ranks import Ranks
from stages.common.rollout_engines import RolloutEngine, make_engine
from stages.common.runtime import set_cpu_threads
from stages.common.tracking import (
    MLFLOW_MODEL_ARTIFACT,
    StageContext,
    fetch_dataset,
    fetch_verified,
    log_artifact,
    log_model,
)
from stages.rl import checkpoint
from stages.rl.batch import Batch, collate, forward_slots, micro_batches, padding_share, step_problems
from stages.rl.config import Config, Output
from stages.rl.losses import (
    explained_variance,
    gae,
    group_advantages,
    grpo_loss,
    keep_spread_groups,
    kl_penalty_rewards,
    last_token_rewards,
    masked_mean,
    masked_whiten,
    ppo_loss,
)
from stages.rl.models import (
    Models,
    PrefixKV,
    build_models,
    critic_values,
    prefix_kv,
    score,
    supports_shared_prefix,
)
from stages.rl.rewards import episode_return, group_plausible_distinct

log = logging.getLogger("ufo.rl")


def train(config: Config, ctx: StageContext) -> Output:
    if config.data is None or config.sft is None:
        raise ConfigError("rl.data and rl.sft: the curate and SFT stages' Outputs are required (the flow sets them)")
    problems_path = fetch_dataset(config.data.artifact("train"), ctx.workdir / "in", name="train", context="training")
    model_dir = fetch_verified(config.sft.artifact("model"), ctx.workdir / "in")
    tokenizer = load_tokenizer(model_dir)
    _check_lengths(config, ChatFormat(tokenizer, config.feedback), problems_from(load_split(problems_path)),
                   int(AutoConfig.from_pretrained(model_dir).max_position_embeddings))
    resume = _resume(config, ctx)
    out_dir = ctx.workdir / "out"
    if config.engine.kind == "torch":
        set_cpu_threads()
        result = fit(config, problems_path, model_dir, resume and resume.folder, ctx.run_id, out_dir,
                     lambda m, step: mlflow.log_metrics(m, step=step))
    else:
        result = _fit_on_ranks(config, ctx, problems_path, model_dir, resume, out_dir)
    return _finish(config, result, out_dir, ctx)


def fit(config: Config, problems_path: Path, model_dir: Path, resume_folder: Path | None, run_id: str,
        out_dir: Path, log_metrics: Callable[[dict[str, float], int], None]) -> dict:
    """The training loop, in the stage process (engine.kind=torch) or on every rank the stage launched
    (deepspeed; see stages/common/ranks.py for how a step is shared). Rank 0 logs each step's metrics through
    `log_metrics`, saves the checkpoints into run `run_id` and writes the merged model to out_dir/model.
    `resume_folder`: a fetched checkpoint to continue from (`_resume`), or None.

    Returns (the same on every rank) {"history": per-step metrics, "first_step", "seconds"}.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    problems = problems_from(load_split(problems_path))
    models = build_models(config, model_dir, device)
    ranks = Ranks.of(models.policy_engine)
    fmt = ChatFormat(models.tokenizer, config.feedback)
    engine = make_engine(config.rollout_engine, models.hf_policy, eos_id=fmt.eos_id, pad_id=fmt.pad_id,
                         batch_size=config.rollout_batch_size, model_path=model_dir,
                         max_model_len=config.max_episode_tokens, seed=config.seed,
                         gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                         lora_rank=config.engine.lora.r if config.engine.lora is not None else None)
    first_step, history = 1, []
    if resume_folder is not None:
        step, history = checkpoint.restore_checkpoint(models, resume_folder)
        first_step = step + 1
        engine.sync_weights(models.policy_engine)
    t_start = time.time()
    for step in range(first_step, config.steps + 1):
        # 1-4. rollout -> reward -> advantage -> update
        metrics = train_step(config, step, models, engine, fmt, problems, device, ranks)
        # 5. log
        if ranks.main:
            log_metrics(metrics, step)
        history.append({"step": step, **metrics})
        if ranks.main and (step % 10 == 0 or step == first_step):
            log.info("step %d reward %.3f succ@1 %.3f succ@%d %.3f kl %.4f (%.2fs)", step,
                     metrics["rollout/reward_mean"], metrics["rollout/succ_at_1"], config.max_turns,
                     metrics[f"rollout/succ_at_{config.max_turns}"], metrics["loss/kl"], metrics["perf/step_seconds"])
        # 6. checkpoint (a collective under DeepSpeed: every rank writes its optimizer partition)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            t0 = time.time()
            checkpoint.save_checkpoint(models, step, step * config.problems_per_step, history,
                                       out_dir / "checkpoints", run_id, ranks)
            if ranks.main:
                log_metrics({"perf/checkpoint_seconds": time.time() - t0}, step)
    seconds = time.time() - t_start
    # A plain transformers folder (LoRA adapters merged by peft); a collective under ZeRO-3.
    models.policy_engine.export(models.tokenizer, out_dir / "model")
    ranks.barrier()
    return {"history": history, "first_step": first_step, "seconds": seconds}


def _fit_on_ranks(config: Config, ctx: StageContext, problems_path: Path, model_dir: Path,
                  resume: checkpoint.Resume | None, out_dir: Path) -> dict:
    """`fit` on engine.world_size ranks (`fit_rank`); returns rank 0's result."""
    job = {"config": config.model_dump(mode="json"), "problems": str(problems_path), "model_dir": str(model_dir),
           "resume": str(resume.folder) if resume is not None else None, "run_id": ctx.run_id,
           "out_dir": str(out_dir)}
    inputs = {"problems": config.data.artifact("train"), "model_dir": config.sft.artifact("model")}
    if resume is not None:
        inputs["resume"] = resume.ref
    return run_on_ranks("rl", config.engine, "stages.rl.stage:fit_rank", job, ctx.workdir / "job", inputs)


def fit_rank(job: dict, log_metrics: Callable[[dict[str, float], int], None]) -> dict:
    """What each rank runs (`python -m stages.common.rank stages.rl.stage:fit_rank JOB.json`)."""
    resume = Path(job["resume"]) if job["resume"] else None
    return fit(Config.model_validate(job["config"]), Path(job["problems"]), Path(job["model_dir"]), resume,
               job["run_id"], Path(job["out_dir"]), log_metrics)


def train_step(config: Config, step: int, models: Models, engine: RolloutEngine, fmt: ChatFormat,
               problems: list[Problem], device: torch.device, ranks: Ranks | None = None) -> dict[str, float]:
    """One RL step, phase by phase; returns its metrics (perf/<phase>_seconds for each phase).

    With several ranks, rank 0 rolls out and every rank scores and trains on its share (stages/common/ranks.py).
    """
    ranks = ranks or Ranks()
    timer = PhaseTimer()
    # 1. rollout
    with timer("rollout"):
        models.train(False)
        episodes = None
        if ranks.main or ranks.lockstep_forwards:
            episodes = rollout(None, fmt, step_problems(problems, config.seed, step, config.problems_per_step),
                               group_size=config.group_size, max_turns=config.max_turns,
                               temperature=config.temperature, max_new_tokens=config.max_new_tokens, engine=engine)
        episodes = ranks.share_rollout(episodes)
    # 2. reward (answers were graded during the rollout: the feedback depends on it), rollout filter
    with timer("reward"):
        all_returns = episode_returns(episodes, config)  # [P*G]
        kept = keep_spread_groups(all_returns.view(config.problems_per_step, config.group_size),
                                  config.rollout_filter_fraction)  # [K]
        rows = (kept[:, None] * config.group_size + torch.arange(config.group_size)).flatten()  # [K*G]
        # The prefix pass's backward runs outside the training engine: plain torch only.
        shared = config.shared_prefix and supports_shared_prefix(models.policy) and config.engine.kind == "torch"
        batch = collate([episodes[i] for i in rows.tolist()], fmt.pad_id, shared_prefix=shared)
        returns = all_returns[rows]  # [K*G]
        chunks = micro_batches(batch.lengths, torch.arange(len(batch)), config.micro_batch_tokens,
                               config.micro_batch_call_cost)
    # the log-probs and values at rollout time that the advantage and the loss need
    with timer("ref_forward"):
        if models.has_reference:
            with models.reference_model() as reference:  # a frozen copy, or the LoRA base (adapter off)
                batch.ref_logprobs = forward_all(
                    reference, lambda mb, kv: score(reference, mb, config.temperature, kv=kv).logprobs,
                    batch, chunks, device, ranks)
    with timer("old_forward"):
        if not config.skips_old_forward:
            batch.old_logprobs = forward_all(
                models.policy, lambda mb, kv: score(models.policy, mb, config.temperature, kv=kv).logprobs,
                batch, chunks, device, ranks)
    with timer("value_forward"):
        if models.critic is not None:
            batch.old_values = forward_all(models.value_prefix_model, lambda mb, kv: critic_values(models, mb, kv),
                                           batch, chunks, device, ranks)
    # 3. advantage
    with timer("advantage"):
        adv_stats = assign_advantages(batch, returns, config)
    # 4. update
    with timer("update"):
        update_stats = update(models, batch, config, device, ranks)
        engine.sync_weights(models.policy_engine)
    return update_stats | adv_stats | step_metrics(episodes, all_returns, batch, chunks, config) | timer.metrics() \
        | telemetry(models, episodes, timer)


# --- the phases ----------------------------------------------------------------------------------


def episode_returns(episodes: list[Episode], cfg: Config) -> torch.Tensor:
    """[B] returns in rollout order (grouped by problem)."""
    distinct = ([e.num_distinct for e in episodes] if cfg.repetition_count == "distinct"
                else group_plausible_distinct([e.answers for e in episodes], cfg.group_size))
    return torch.tensor([
        episode_return(e.solved_turn, d, e.num_turns, cfg.gamma, cfg.repetition_penalty)
        for e, d in zip(episodes, distinct, strict=True)
    ])


@torch.no_grad()
def forward_all(model: torch.nn.Module, fn: Callable[[Batch, PrefixKV | None], torch.Tensor], batch: Batch,
                chunks: list[torch.Tensor], device: torch.device, ranks: Ranks | None = None) -> torch.Tensor:
    """fn over every micro-batch (after `model` ran the shared prefixes once), reassembled into one
    [B, L] CPU tensor in batch order. With several ranks each scores its share of the micro-batches and
    the rows are summed over ranks (every row from exactly one rank: exact)."""
    ranks = ranks or Ranks()
    kv = prefix_kv(model, batch) if batch.has_prefix else None
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)  # [B, L]
    for idx, weight in ranks.deal(chunks, pad=ranks.lockstep_forwards):
        res = fn(batch.rows(idx, device), kv)  # [b, l]
        if weight:
            out[idx, : res.shape[1]] = res.float().cpu()
    return ranks.sum(out)


def assign_advantages(batch: Batch, returns: torch.Tensor, cfg: Config) -> dict[str, float]:
    """Fill batch.advantages (and batch.returns for PPO) from the episode returns; return stats.

    PPO: the return sits on the last generated token (minus the per-token KL when kl_mode=reward), and
    GAE runs over the generated tokens of all turns. GRPO: return (minus the episode's summed KL when
    kl_mode=reward) relative to its group.
    """
    mask = batch.response_mask  # [B, L]
    kl_rewards = None
    if cfg.kl_mode == "reward" and cfg.kl_coef > 0:
        kl_rewards = kl_penalty_rewards(batch.old_logprobs, batch.ref_logprobs, mask, cfg.kl_coef)  # [B, L]
    if cfg.algorithm == "grpo":
        shaped = returns + (kl_rewards.sum(dim=1) if kl_rewards is not None else 0.0)  # [B]
        batch.advantages = group_advantages(shaped.view(-1, cfg.group_size), scale=cfg.scale_advantages).flatten()
        return {}
    rewards = last_token_rewards(returns.float(), mask)  # [B, L]
    if kl_rewards is not None:
        rewards = rewards + kl_rewards
    advantages, targets = gae(rewards, batch.old_values, mask, cfg.gamma_gae, cfg.lambda_gae)  # [B, L]
    batch.advantages = masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages
    batch.returns = targets
    return {
        "loss/explained_variance": float(explained_variance(batch.old_values, targets, mask)),
        "loss/value_mean": float(masked_mean(batch.old_values, mask)),
        "loss/return_mean": float(masked_mean(targets, mask)),
        "loss/advantage_abs_mean": float(masked_mean(advantages.abs(), mask)),
    }


def update(models: Models, batch: Batch, cfg: Config, device: torch.device,
           ranks: Ranks | None = None) -> dict[str, float]:
    """ppo_epochs passes of minibatch optimizer steps, each accumulated over length-bucketed micro-batches.

    Each micro-batch's loss is its token mean weighted by its share of the minibatch's generated
    tokens, so the accumulated gradient is that of the minibatch's token mean, however it is cut.
    Shared prefixes run once per minibatch: the micro-batches' gradients with respect to their keys/
    values accumulate on detached copies, then flow back through the prefix pass in one backward.
    With several ranks, each takes its share of the micro-batches (the same number on every rank, topped
    up with weight-0 repeats) and the weights are shares of the whole minibatch, so the gradients that
    DeepSpeed reduces add up to the one-process gradient.
    """
    ranks = ranks or Ranks()
    models.train(True)
    totals: dict[str, float] = defaultdict(float)
    num_steps = 0
    for _epoch in range(cfg.ppo_epochs):
        one_minibatch = cfg.minibatch_size == len(batch)
        order = torch.arange(len(batch)) if one_minibatch else torch.randperm(len(batch))
        for start in range(0, len(batch), cfg.minibatch_size):
            idx = order[start:start + cfg.minibatch_size]
            tokens = batch.response_mask[idx].sum().clamp(min=1)
            prefixes = _PrefixGrads(models, batch)
            chunks = micro_batches(batch.lengths, idx, cfg.micro_batch_tokens, cfg.micro_batch_call_cost)
            mine = ranks.deal(chunks, pad=True)
            models.expect_backwards(len(mine))
            shares: dict[str, float] = defaultdict(float)
            for chunk, use in mine:
                mb = batch.rows(chunk, device)
                weight = use * float(mb.response_mask.sum() / tokens)
                actor, critic, stats = micro_batch_loss(models, mb, cfg, prefixes.policy, prefixes.critic)
                models.backward(actor * weight, critic * weight if critic is not None else None)
                for k, v in stats.items():
                    shares[k] += float(v) * weight
            prefixes.backward()
            for k, v in ranks.sum_values(dict(shares)).items():
                totals[k] += v
            for k, v in models.step().items():
                totals[k] += v
            num_steps += 1
    return {k: v / num_steps for k, v in totals.items()}


class _PrefixGrads:
    """The policy's (and a separate critic's) prefix keys/values for one minibatch, with grad: handed to
    the micro-batches as detached leaves, whose accumulated grads `backward` sends through the prefix
    pass once."""

    def __init__(self, models: Models, batch: Batch):
        self.graphs: list[PrefixKV] = []
        self.policy = self._leaves(models.policy, batch)
        separate = models.critic is not None and not models.shared_critic
        self.critic = self._leaves(models.critic, batch) if separate else None

    def _leaves(self, model, batch: Batch) -> PrefixKV | None:
        if not batch.has_prefix:
            return None
        kv = prefix_kv(model, batch)
        self.graphs.append(kv)
        return [(k.detach().requires_grad_(True), v.detach().requires_grad_(True)) for k, v in kv]

    def backward(self) -> None:
        leaves = [t for kv in (self.policy, self.critic) if kv for pair in kv for t in pair]
        graphs = [t for kv in self.graphs for pair in kv for t in pair]
        pairs = [(g, leaf.grad) for g, leaf in zip(graphs, leaves, strict=True) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([g for g, _ in pairs], [grad for _, grad in pairs])


def micro_batch_loss(models: Models, mb: Batch, cfg: Config, policy_kv: PrefixKV | None = None,
                     critic_kv: PrefixKV | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The algorithm's loss on one micro-batch (with grad): (actor loss, weighted value loss or None, stats)."""
    value_head = models.critic if models.shared_critic else None
    s = score(models.policy, mb, cfg.temperature, entropy=cfg.entropy_coef > 0, value_head=value_head, kv=policy_kv)
    # One epoch, one minibatch: the pre-update log-probs ARE this forward's; detach (ratio exactly 1).
    old = mb.old_logprobs if mb.old_logprobs is not None else s.logprobs.detach()  # [B, L]
    kl_coef = cfg.kl_coef if cfg.kl_mode == "loss" else 0.0
    common = {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "kl_coef": kl_coef, "entropy": s.entropy,
              "entropy_coef": cfg.entropy_coef}
    if cfg.algorithm == "ppo":
        values = s.values if value_head is not None else critic_values(models, mb, critic_kv)  # [B, L]
        actor, critic, stats = ppo_loss(s.logprobs, old, mb.ref_logprobs, mb.advantages, values, mb.old_values,
                                        mb.returns, mb.response_mask, value_clip=cfg.value_clip,
                                        value_loss_coef=cfg.value_loss_coef, **common)
    else:
        critic = None
        actor, stats = grpo_loss(s.logprobs, old, mb.ref_logprobs, mb.advantages, mb.response_mask, **common)
    # How far the rollout engine's log-probs are from the trainer's (kernels, padding, precision).
    stats["rollout/logprob_abs_diff"] = masked_mean((mb.rollout_logprobs - old).abs(), mb.response_mask)
    return actor, critic, stats


def step_metrics(episodes: list[Episode], all_returns: torch.Tensor, batch: Batch, chunks: list[torch.Tensor],
                 cfg: Config) -> dict[str, float]:
    metrics = {f"rollout/{k}": v for k, v in episode_metrics(episodes, cfg.max_turns).items()}
    spread = all_returns.view(cfg.problems_per_step, cfg.group_size).std(dim=1)  # [P]
    metrics |= {
        "rollout/reward_mean": float(all_returns.mean()),
        "rollout/reward_std": float(all_returns.std()),
        "rollout/group_spread_mean": float(spread.mean()),
        "rollout/kept_episodes": float(len(batch)),
        "rollout/generated_tokens": float(batch.response_mask.sum()),
    }
    slots, real = forward_slots(batch, chunks)
    full = batch.lengths + batch.prefix_lens  # [B] whole episodes
    metrics |= {
        "perf/forward_slots": float(slots),
        "perf/padding_share": 1.0 - real / slots,
        "perf/forward_slots_unbucketed": float(len(full) * int(full.max())),
        "perf/padding_share_unbucketed": padding_share(full, [torch.arange(len(batch))]),
    }
    if cfg.kl_mode == "reward" and cfg.kl_coef > 0:  # the KL the reward was charged (k1, at rollout time)
        metrics["loss/kl"] = float(masked_mean(batch.old_logprobs - batch.ref_logprobs, batch.response_mask))
    return metrics


def telemetry(models: Models, episodes: list[Episode], timer: PhaseTimer) -> dict[str, float]:
    """What a TRL user reads beside the losses and grad norm: the learning rate and token throughput.

    `perf/tokens_per_second`: every token of the step's episodes (question, feedback and answers, filtered
    episodes included: the rollout paid for them) per second of the whole step; `perf/generated_tokens_
    per_second`: the answers' tokens per second of the rollout phase.
    """
    tokens = sum(len(e.token_ids()) for e in episodes)
    generated = sum(len(t.answer_ids) for e in episodes for t in e.turns)
    return {"train/lr": models.policy_engine.lr(),
            "perf/tokens_per_second": tokens / max(time.time() - timer.start, 1e-9),
            "perf/generated_tokens_per_second": generated / max(timer.seconds["rollout"], 1e-9)}


class PhaseTimer:
    """Wall time per phase of a step, logged as perf/<phase>_seconds (and perf/step_seconds)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.time()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.time()
        yield
        self.seconds[phase] = time.time() - t0

    def metrics(self) -> dict[str, float]:
        return {f"perf/{k}_seconds": v for k, v in self.seconds.items()} | {"perf/step_seconds": time.time() - self.start}


# --- start and end -------------------------------------------------------------------------------


def _resume(config: Config, ctx: StageContext) -> checkpoint.Resume | None:
    """Tag this run with its resume key; fetch the newest matching checkpoint if there is one, and log its
    metric history into this run again, so that the run's curves are complete."""
    run = mlflow.active_run()
    found = checkpoint.fetch_resume_point(config, ctx.run_id, run.info.experiment_id, ctx.workdir)
    if found is None:
        return None
    log.info("resuming from run %s at step %d (of %d)", found.run_id, found.step, config.steps)
    mlflow.set_tag(checkpoint.TAG_RESUMED_FROM, f"{found.run_id}@step-{found.step}")
    now = int(time.time() * 1000)
    history = checkpoint.read_history(found.folder)
    old = [Metric(k, v, now, int(h["step"])) for h in history for k, v in h.items() if k != "step"]
    for i in range(0, len(old), 1000):  # MLflow's log_batch takes at most 1000 metrics
        MlflowClient().log_batch(ctx.run_id, metrics=old[i:i + 1000])
    return found


def _finish(config: Config, result: dict, out_dir: Path, ctx: StageContext) -> Output:
    last = result["history"][-10:]
    summary = {
        "rl/steps": float(config.steps),
        "rl/resumed_at_step": float(result["first_step"] - 1),
        "rl/train_reward_last10": sum(h["rollout/reward_mean"] for h in last) / max(1, len(last)),
        "perf/train_seconds": result["seconds"],
    }
    mlflow.log_metrics(summary)
    # A plain transformers folder (LoRA adapters merged by peft), written by `fit` (rank 0 under DeepSpeed).
    model_ref = log_artifact(out_dir / "model", "model")
    card = (f"UFO multi-turn RL with unary feedback (stages/rl), MLflow run {ctx.run_id}: {config.algorithm}, "
            f"{config.steps} steps, T = {config.max_turns}, gamma = {config.gamma}, "
            f"lambda = {config.repetition_penalty}, feedback {config.feedback!r}.")
    artifacts = {"model": model_ref, MLFLOW_MODEL_ARTIFACT: log_model(out_dir / "model", name="rl", description=card)}
    return Output(run_id=ctx.run_id, artifacts=artifacts, metrics=summary)


def _check_lengths(cfg: Config, fmt: ChatFormat, problems, max_positions: int) -> None:
    """Fail early, naming the field or row, rather than truncate an episode mid-training."""
    if len(fmt.feedback_ids) > cfg.max_feedback_tokens:
        raise ConfigError(f"rl.max_feedback_tokens: the feedback turn takes {len(fmt.feedback_ids)} tokens "
                          f"with this tokenizer, more than {cfg.max_feedback_tokens}")
    for p in problems:
        if len(fmt.prompt_ids(p.question)) > cfg.max_prompt_tokens:
            raise ConfigError(f"rl.max_prompt_tokens: row {p.id} has a {len(fmt.prompt_ids(p.question))}-token "
                              f"prompt, more than {cfg.max_prompt_tokens}")
    limit = max_positions
    if cfg.max_episode_tokens > limit:
        raise ConfigError(f"rl.max_turns: an episode can take {cfg.max_episode_tokens} tokens, more than the "
                          f"model's {limit} positions")
    if len(problems) < cfg.problems_per_step:
        raise ConfigError(f"rl.problems_per_step: {cfg.problems_per_step} problems per step, but the training "
                          f"split has only {len(problems)}")

