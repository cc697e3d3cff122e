"""SFT training (see stages/sft/__init__.py for what and why).

One training loop, `fit`, runs either in the stage process (engine.kind=torch) or on every rank the stage
launches (engine.kind=deepspeed: `fit_rank` under torchrun or the deepspeed launcher, stages/common/rank.py).
Every rank draws the same global batch from the same seed and trains on its share; the stage process
alone logs the artifacts and returns the Output, and rank 0 alone logs per-step metrics.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import torch

from stages.common.base_model import import_base_model
from stages.common.chat import ChatFormat
from stages.common.config import ConfigError
from stages.common.contracts import BASE_MODEL_ARTIFACT, ArtifactRef, Problem, load_split, problems_from
from stages.common.engine import build_engine
from stages.common.episodes import rollout
from stages.common.grading import equivalent
from stages.common.model import build_model, resolve_device, seed_everything
from stages.common.rank import run_on_ranks
from stages.common.ranks import Ranks
from stages.common.runtime import set_cpu_threads
from stages.common.tracking import (
    MLFLOW_MODEL_ARTIFACT,
    StageContext,
    fetch_dataset,
    log_artifact,
    log_model,
)
from stages.sft.batching import Example, loss_share, micro_batches, num_targets
from stages.sft.config import Config, Output

log = logging.getLogger("ufo.sft")

LogFn = Callable[[dict[str, float], int | None], None]


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of cfg.lr at optimizer step `step`: linear warm-up, then cosine to cfg.min_lr_ratio."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_examples(fmt: ChatFormat, problems: list[Problem], cfg: Config, rng: random.Random) -> list[Example]:
    """One optimizer step's conversations (all ranks' shares): a multi_turn_fraction of them answer after
    1..max_wrong_attempts wrong attempts, each an answer to ANOTHER problem, each followed by feedback."""
    examples = []
    for _ in range(cfg.batch_size):
        p = rng.choice(problems)
        wrong: list[str] = []
        if rng.random() < cfg.multi_turn_fraction:
            k = rng.randint(1, cfg.max_wrong_attempts)
            while len(wrong) < k:
                other = rng.choice(problems).answer
                if not equivalent(p.answer, other):
                    wrong.append(other)
        ids, mask = fmt.sft_example(p.question, wrong, p.answer)
        examples.append((ids, mask, len(wrong)))
    return examples


def sampled_accuracy(model, fmt: ChatFormat, problems: list[Problem], max_new_tokens: int, seed: int) -> float:
    """Single-turn accuracy at temperature 1, sampled from a fixed seed: every rank draws the same
    samples (ZeRO-3 needs the same forwards on every rank) and the global RNG is left as it was."""
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        eps = rollout(model, fmt, problems, group_size=1, max_turns=1, temperature=1.0,
                      max_new_tokens=max_new_tokens)
    model.train()
    return sum(e.solved_turn is not None for e in eps) / len(eps)


def fit(config: Config, train_df: pd.DataFrame, val_df: pd.DataFrame, out_dir: Path, log_metrics: LogFn,
        base_dir: Path | None = None) -> dict:
    """Train; on rank 0 write the merged model to out_dir/model (and LoRA adapters to out_dir/adapter).

    `base_dir`: a pretrained start's imported copy (stages/common/base_model.py), None for a scratch model.
    Returns the summary metrics (the same on every rank but for the timing; the stage logs rank 0's).
    `log_metrics` is called on rank 0 only.
    """
    set_cpu_threads()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    texts = [*train_df.question, *train_df.answer]
    model, tokenizer = build_model(config.model, texts, config.feedback, device, base_dir)
    fmt = ChatFormat(tokenizer, config.feedback)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, config.engine, lr=config.lr, weight_decay=config.weight_decay,
                          grad_clip=config.grad_clip, lr_lambda=lr_lambda(config), micro_steps=config.micro_steps)
    ranks = Ranks.of(engine)
    main = ranks.main
    n_trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    if main:
        log_metrics({"model/parameters": n_params, "model/trainable_parameters": n_trainable}, None)
        log.info("model: %s, %.2fM parameters (%.2fM trainable), vocab %d, on %s, %d rank(s)",
                 type(model).__name__, n_params / 1e6, n_trainable / 1e6, len(tokenizer), device, engine.world_size)
    pack_length = config.pack_length or int(model.config.max_position_embeddings)
    train_problems, val_problems = problems_from(train_df), problems_from(val_df)
    rng = random.Random(config.seed)
    val_subset = rng.sample(val_problems, min(config.val_problems, len(val_problems)))
    engine.module.train()
    val_acc, step, t0, tokens = 0.0, 0, time.time(), 0
    for step in range(1, config.max_steps + 1):
        examples = make_examples(fmt, train_problems, config, rng)  # the same global batch on every rank
        targets = num_targets(examples)
        tokens += sum(len(ids) for ids, _, _ in examples)  # the whole step's, all ranks (no padding)
        share = 0.0
        for forwards in micro_batches(examples[engine.rank::engine.world_size], config, fmt.pad_id, pack_length,
                                      device):
            loss = loss_share(engine.module, forwards, targets)
            engine.backward(loss)
            share += loss.item()
        grad_norm = engine.step()
        if step % config.log_every == 0:
            loss_value = ranks.sum_values({"loss": share})["loss"]
            if main:
                log_metrics({"loss/sft": loss_value, "loss/grad_norm": grad_norm, "train/lr": engine.lr(),
                             "perf/steps_per_second": step / (time.time() - t0), "train/num_tokens": tokens,
                             "perf/tokens_per_second": tokens / (time.time() - t0)}, step)
        if step % config.eval_every == 0 or step == config.max_steps:
            # rank 0's accuracy on every rank, so that every rank takes the same stopping decision
            val_acc = ranks.from_main(sampled_accuracy(engine.hf_model, fmt, val_subset, config.max_new_tokens,
                                                       seed=config.seed * 100_003 + step))
            loss_value = ranks.sum_values({"loss": share})["loss"]
            if main:
                log_metrics({"val/sampled_accuracy": val_acc}, step)
                log.info("step %d loss %.4f val sampled accuracy %.3f", step, loss_value, val_acc)
            if val_acc >= config.target_val_accuracy:
                break
    reached = val_acc >= config.target_val_accuracy
    if main and not reached:
        log.warning("stopped at max_steps=%d with val accuracy %.3f < target %.3f",
                    config.max_steps, val_acc, config.target_val_accuracy)
    metrics = {"sft/steps": float(step), "sft/val_sampled_accuracy": val_acc,
               "sft/target_reached": float(reached), "perf/train_seconds": time.time() - t0}
    if config.warm_start == "stubborn":  # continued SFT into a model that repeats itself after feedback
        from stages.sft.stubborn import make_stubborn

        metrics |= make_stubborn(engine, fmt, train_problems, val_problems, config, rng, pack_length, device,
                                 log_metrics, first_step=step)
    engine.export(tokenizer, out_dir / "model")  # a collective under ZeRO-3: every rank calls it
    if config.engine.lora is not None:
        engine.export_adapter(out_dir / "adapter")
    return metrics


def train(config: Config, ctx: StageContext) -> Output:
    if config.data is None:
        raise ConfigError("sft.data: the curate stage's Output is required (the flow sets it)")
    train_path = fetch_dataset(config.data.artifact("train"), ctx.workdir / "in", name="train", context="training")
    val_path = fetch_dataset(config.data.artifact("val"), ctx.workdir / "in", name="val", context="validation")
    base_dir, base_ref = None, None
    if config.model.pretrained:  # imported once into MLflow; trained from (and evaluated as) that copy
        t0 = time.time()
        base_dir, base_ref = import_base_model(config.model, ctx.workdir)
        mlflow.log_metric("perf/base_model_seconds", time.time() - t0)
    if config.engine.kind == "torch":
        metrics = fit(config, load_split(train_path), load_split(val_path), ctx.workdir,
                      lambda m, step: mlflow.log_metrics(m, step=step), base_dir)
    else:
        metrics = _train_on_ranks(config, ctx, train_path, val_path, base_dir, base_ref)
    mlflow.log_metrics(metrics)
    artifacts = {"model": log_artifact(ctx.workdir / "model", "model")}
    if base_ref is not None:
        artifacts[BASE_MODEL_ARTIFACT] = base_ref
    card = (f"UFO SFT warm start (stages/sft), MLflow run {ctx.run_id}: {config.max_steps} steps on the curated "
            f"`train` split, up to {config.max_wrong_attempts} wrong attempts with feedback before the answer.")
    artifacts[MLFLOW_MODEL_ARTIFACT] = log_model(ctx.workdir / "model", name="sft", description=card)
    if (ctx.workdir / "adapter").is_dir():
        artifacts["adapter"] = log_artifact(ctx.workdir / "adapter", "adapter")
    return Output(run_id=ctx.run_id, artifacts=artifacts, metrics=metrics)


def _train_on_ranks(config: Config, ctx: StageContext, train_path: Path, val_path: Path,
                    base_dir: Path | None, base_ref: ArtifactRef | None) -> dict:
    """`fit` on engine.world_size ranks (`fit_rank`); returns rank 0's metrics."""
    job = {"config": config.model_dump(mode="json"), "train": str(train_path), "val": str(val_path),
           "run_id": ctx.run_id, "out_dir": str(ctx.workdir), "base_dir": str(base_dir) if base_dir else None}
    inputs = {"train": config.data.artifact("train"), "val": config.data.artifact("val")}
    if base_ref is not None:
        inputs["base_dir"] = base_ref
    return run_on_ranks("sft", config.engine, "stages.sft.stage:fit_rank", job, ctx.workdir / "job", inputs)


def fit_rank(job: dict, log_metrics: LogFn) -> dict:
    """What each rank runs (`python -m stages.common.rank stages.sft.stage:fit_rank JOB.json`)."""
    return fit(Config.model_validate(job["config"]), load_split(job["train"]), load_split(job["val"]),
               Path(job["out_dir"]), log_metrics, Path(job["base_dir"]) if job.get("base_dir") else None)
