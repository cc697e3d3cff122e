"""SFT training (see stages/sft/__init__.py for what and why)."""

from __future__ import annotations

import logging
import math
import random
import time

import mlflow
import torch

from stages.common.chat import ChatFormat, build_char_tokenizer
from stages.common.config import ConfigError
from stages.common.contracts import Problem, load_split, problems_from
from stages.common.episodes import rollout
from stages.common.grading import equivalent
from stages.common.model import (
    load_pretrained,
    new_scratch_model,
    resolve_device,
    save_pretrained,
    seed_everything,
)
from stages.common.runtime import set_cpu_threads
from stages.common.tracking import StageContext, fetch_verified, log_artifact
from stages.sft.config import Config, Output

log = logging.getLogger("ufo.sft")


def _lr_lambda(cfg: Config):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_batches(fmt: ChatFormat, problems: list[Problem], cfg: Config, rng: random.Random,
                 device: torch.device) -> list[dict[str, torch.Tensor]]:
    """One optimizer step's examples as right-padded sub-batches; labels are -100 but on the final answer.

    Examples are bucketed by their number of earlier attempts: padded together, every example would
    be padded to the longest 4-attempt one (~4x a single-turn example), doubling a step's compute.
    """
    buckets: dict[int, list[tuple[list[int], list[int]]]] = {k: [] for k in range(cfg.max_wrong_attempts + 1)}
    for _ in range(cfg.batch_size):
        p = rng.choice(problems)
        wrong: list[str] = []
        if rng.random() < cfg.multi_turn_fraction:
            k = rng.randint(1, cfg.max_wrong_attempts)
            while len(wrong) < k:
                other = rng.choice(problems).answer
                if not equivalent(p.answer, other):
                    wrong.append(other)
        buckets[len(wrong)].append(fmt.sft_example(p.question, wrong, p.answer))
    return [_collate(examples, fmt.pad_id, device) for examples in buckets.values() if examples]


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros_like(input_ids)  # [B, L]
    labels = torch.full_like(input_ids, -100)  # [B, L]
    for i, (ids, mask) in enumerate(examples):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), -100)
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def sft_loss(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean cross-entropy over all answer tokens of the step, whichever sub-batch they are in."""
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]  # HF shifts labels by one
    total = sum(counts)
    return sum(model(**b).loss * (n / total) for b, n in zip(batches, counts, strict=True))


def sampled_accuracy(model, fmt: ChatFormat, problems: list[Problem], max_new_tokens: int) -> float:
    model.eval()
    eps = rollout(model, fmt, problems, group_size=1, max_turns=1, temperature=1.0, max_new_tokens=max_new_tokens)
    model.train()
    return sum(e.solved_turn is not None for e in eps) / len(eps)


def train(config: Config, ctx: StageContext) -> Output:
    if config.data is None:
        raise ConfigError("sft.data: the curate stage's Output is required (the flow sets it)")
    set_cpu_threads()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_df = load_split(fetch_verified(config.data.artifact("train"), ctx.workdir / "in"))
    val_df = load_split(fetch_verified(config.data.artifact("val"), ctx.workdir / "in"))
    if config.model.init == "scratch":
        texts = [*train_df.question, *train_df.answer]
        tokenizer = build_char_tokenizer(texts, config.feedback)
        model = new_scratch_model(config.model, tokenizer).to(device)
    else:
        model, tokenizer = load_pretrained(config.model.name_or_path, device)
    fmt = ChatFormat(tokenizer, config.feedback)
    n_params = sum(p.numel() for p in model.parameters())
    mlflow.log_metric("model/parameters", n_params)
    log.info("model: %s, %.2fM parameters, vocab %d, on %s", type(model).__name__, n_params / 1e6,
             len(tokenizer), device)

    train_problems, val_problems = problems_from(train_df), problems_from(val_df)
    rng = random.Random(config.seed)
    val_subset = rng.sample(val_problems, min(config.val_problems, len(val_problems)))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    model.train()
    val_acc, step, t0 = 0.0, 0, time.time()
    for step in range(1, config.max_steps + 1):
        loss = sft_loss(model, make_batches(fmt, train_problems, config, rng, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            mlflow.log_metrics({"loss/sft": loss.item(), "perf/steps_per_second": step / (time.time() - t0)},
                               step=step)
        if step % config.eval_every == 0 or step == config.max_steps:
            val_acc = sampled_accuracy(model, fmt, val_subset, config.max_new_tokens)
            mlflow.log_metric("val/sampled_accuracy", val_acc, step=step)
            log.info("step %d loss %.4f val sampled accuracy %.3f", step, loss.item(), val_acc)
            if val_acc >= config.target_val_accuracy:
                break
    reached = val_acc >= config.target_val_accuracy
    if not reached:
        log.warning("stopped at max_steps=%d with val accuracy %.3f < target %.3f",
                    config.max_steps, val_acc, config.target_val_accuracy)
    metrics = {"sft/steps": float(step), "sft/val_sampled_accuracy": val_acc,
               "sft/target_reached": float(reached), "perf/train_seconds": time.time() - t0}
    mlflow.log_metrics(metrics)
    model_ref = log_artifact(save_pretrained(model, tokenizer, ctx.workdir / "model"), "model")
    return Output(run_id=ctx.run_id, artifacts={"model": model_ref}, metrics=metrics)
