"""SFT warmup: teach the policy the answer format, and to answer again after "Let's try again.".

A mix of single-turn examples and multi-turn ones whose earlier attempts are answers to OTHER random
problems, each followed by the feedback turn; loss on the final answer's tokens only. Without the
multi-turn share the model cannot continue after feedback (most later answers are unparsable); with
near-miss wrong attempts it learns to copy the previous attempt (see
shared/research/tiny-cpu-calibration.md). Training stops when sampled validation accuracy reaches a
target, since a fixed step count lands different seeds in very different places.

Launch: python -m stages.sft --config sft.yaml   (its `data` field holds the curate Output)
"""

from __future__ import annotations

import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from pydantic import Field, model_validator

from stages.common.chat import ChatFormat, build_char_tokenizer
from stages.common.cli import stage_main
from stages.common.config import ConfigError, StageConfig
from stages.common.episodes import Problem, rollout
from stages.common.grading import equivalent
from stages.common.model import (
    Device,
    ModelConfig,
    load_pretrained,
    new_scratch_model,
    resolve_device,
    save_pretrained,
    seed_everything,
    set_cpu_threads,
)
from stages.common.tracking import StageOutput, fetch_verified, log_artifact, stage_run
from stages.curate import Output as CurateOutput
from stages.curate import load_split

log = logging.getLogger("ufo.sft")
DEFAULT_FEEDBACK = "Let's try again."


class Config(StageConfig):
    device: Device = "auto"
    """auto = cuda when visible, else cpu."""
    data: CurateOutput | None = None
    """The curate stage's Output (set by the flow; give it by hand to rerun this stage alone)."""
    model: ModelConfig = ModelConfig()
    """The policy to warm up."""
    feedback: str = DEFAULT_FEEDBACK
    """The unary feedback text used in multi-turn examples (the pipeline copies rl.feedback here)."""
    batch_size: int = Field(128, ge=1)
    """Examples per optimizer step. Time per step grows linearly."""
    lr: float = Field(3e-3, gt=0)
    """AdamW peak learning rate (3e-3 suits the 0.5M scratch model; ~1e-5 for a 3B pretrained one)."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up steps, then cosine decay to 10% at max_steps."""
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int = Field(1200, ge=1)
    """Hard cap on optimizer steps (~8 steps/s for the tiny default on 2 cores)."""
    eval_every: int = Field(50, ge=1)
    """Check the stopping rule every this many steps."""
    target_val_accuracy: float = Field(0.40, gt=0, le=1)
    """Stop once sampled (temperature 1) single-turn accuracy on the val split reaches this."""
    val_problems: int = Field(256, ge=1)
    """Validation problems sampled for the stopping rule (~0.3 s per check at 256)."""
    multi_turn_fraction: float = Field(0.5, ge=0, le=1)
    """Share of examples with 1..max_wrong_attempts earlier wrong attempts followed by feedback. Measured
    on the tiny default (2 seeds each): 0.3 -> Succ@5 - Succ@1 of 0.07-0.10, 0.5 -> 0.27."""
    max_wrong_attempts: int = Field(4, ge=1)
    """Most wrong attempts before the final answer in a multi-turn example (keep < rl.max_turns)."""
    max_new_tokens: int = Field(8, ge=1)
    """Answer length cap when sampling for validation."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.eval_every > self.max_steps:
            raise ValueError(f"eval_every: {self.eval_every} must be <= max_steps ({self.max_steps})")
        return self


class Output(StageOutput):
    stage: str = "sft"


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


def problems_from(df) -> list[Problem]:
    return [Problem(r.id, r.question, r.answer) for r in df.itertuples()]


def sampled_accuracy(model, fmt: ChatFormat, problems: list[Problem], max_new_tokens: int) -> float:
    model.eval()
    eps = rollout(model, fmt, problems, group_size=1, max_turns=1, temperature=1.0, max_new_tokens=max_new_tokens)
    model.train()
    return sum(e.solved_turn is not None for e in eps) / len(eps)


def run(config: Config, parent_run_id: str | None = None) -> Output:
    if config.data is None:
        raise ConfigError("sft.data: the curate stage's Output is required (the flow sets it)")
    set_cpu_threads()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    with stage_run("sft", config, config.experiment, parent_run_id) as run_, tempfile.TemporaryDirectory() as tmp:
        train = load_split(fetch_verified(config.data.artifact("train"), Path(tmp) / "in"))
        val = load_split(fetch_verified(config.data.artifact("val"), Path(tmp) / "in"))
        if config.model.init == "scratch":
            texts = [*train.question, *train.answer]
            tokenizer = build_char_tokenizer(texts, config.feedback)
            model = new_scratch_model(config.model, tokenizer).to(device)
        else:
            model, tokenizer = load_pretrained(config.model.name_or_path, device)
        fmt = ChatFormat(tokenizer, config.feedback)
        n_params = sum(p.numel() for p in model.parameters())
        mlflow.log_metric("model/parameters", n_params)
        log.info("model: %s, %.2fM parameters, vocab %d, on %s", type(model).__name__, n_params / 1e6,
                 len(tokenizer), device)

        train_problems, val_problems = problems_from(train), problems_from(val)
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
        model_ref = log_artifact(save_pretrained(model, tokenizer, Path(tmp) / "model"), "model")
        return Output(run_id=run_.info.run_id, artifacts={"model": model_ref}, metrics=metrics)


if __name__ == "__main__":
    sys.exit(stage_main("sft", Config, run))
