"""Evaluation (see stages/evaluate/__init__.py): every metric of each model, a plot, a table."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow
import pandas as pd

from stages.common.chat import ChatFormat
from stages.common.config import ConfigError
from stages.common.contracts import ArtifactRef, Problem, load_split, problems_from
from stages.common.episodes import rollout
from stages.common.metrics import episode_metrics, pass_at_k
from stages.common.model import load_pretrained, resolve_device, seed_everything
from stages.common.runtime import set_cpu_threads
from stages.common.tracking import StageContext, fetch_verified, log_artifact
from stages.evaluate.config import Config, Output

log = logging.getLogger("ufo.evaluate")


def evaluate_model(model, fmt: ChatFormat, problems: list[Problem], cfg: Config) -> tuple[dict[str, float], pd.DataFrame]:
    """All metrics of one model, and a per-problem table of its attempts."""
    model.eval()
    episodes = rollout(model, fmt, problems, group_size=1, max_turns=cfg.max_turns,
                       temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    metrics = episode_metrics(episodes, cfg.max_turns)
    singles = rollout(model, fmt, problems, group_size=cfg.num_samples, max_turns=1,
                      temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    n = cfg.num_samples
    correct = [sum(singles[i * n + j].solved_turn == 0 for j in range(n)) for i in range(len(problems))]
    for k in range(1, cfg.max_turns + 1):
        metrics[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(problems)
    greedy = rollout(model, fmt, problems, group_size=1, max_turns=1, temperature=0.0,
                     max_new_tokens=cfg.max_new_tokens)
    metrics["greedy_accuracy"] = sum(e.solved_turn == 0 for e in greedy) / len(problems)
    table = pd.DataFrame({
        "id": [p.id for p in problems],
        "question": [p.question for p in problems],
        "gold": [p.answer for p in problems],
        "attempts": [json.dumps([t.reply for t in e.turns]) for e in episodes],
        "answers": [json.dumps(e.answers) for e in episodes],
        "solved_turn": [-1 if e.solved_turn is None else e.solved_turn for e in episodes],
        "distinct_answers": [e.num_distinct for e in episodes],
        "single_turn_correct": correct,
    })
    return metrics, table


def plot_curves(results: dict[str, dict[str, float]], max_turns: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in containers
    import matplotlib.pyplot as plt

    ks = list(range(1, max_turns + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results.items():
        ax.plot(ks, [m[f"succ_at_{k}"] for k in ks], marker="o", label=f"{name} Succ@k (multi-turn)")
        ax.plot(ks, [m[f"pass_at_{k}"] for k in ks], marker="s", linestyle="--", label=f"{name} Pass@k (single-turn)")
    ax.set_xlabel("k (turns / samples)")
    ax.set_ylabel("solved fraction")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(config: Config, ctx: StageContext) -> Output:
    if config.data is None:
        raise ConfigError("evaluate.data: the curate stage's Output is required (the flow sets it)")
    models = {name: out for name, out in (("sft", config.sft), ("rl", config.rl)) if out is not None}
    if not models:
        raise ConfigError("evaluate.sft / evaluate.rl: give at least one model to evaluate")
    set_cpu_threads()
    device = resolve_device(config.device)
    if config.split not in config.data.artifacts:
        raise ConfigError(f"evaluate.split: curate output has no split {config.split!r}")
    df = load_split(fetch_verified(config.data.artifact(config.split), ctx.workdir / "in"))
    problems = problems_from(df)[: config.max_problems]
    results: dict[str, dict[str, float]] = {}
    tables = []
    for name, out in models.items():
        model, tokenizer = load_pretrained(fetch_verified(out.artifact("model"), ctx.workdir / name), device)
        seed_everything(config.seed)  # both models see the same sampling seed
        t0 = time.time()
        metrics, table = evaluate_model(model, ChatFormat(tokenizer, config.feedback), problems, config)
        results[name] = metrics
        mlflow.log_metrics({f"eval/{name}/{k}": v for k, v in metrics.items()})
        mlflow.log_metric(f"perf/eval_{name}_seconds", time.time() - t0)
        tables.append(table.assign(model=name))
        log.info("%s: %s", name, " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    artifacts: dict[str, ArtifactRef] = {}
    png = ctx.workdir / "succ_pass_at_k.png"
    plot_curves(results, config.max_turns, png)
    artifacts["curves"] = log_artifact(png, "eval")
    examples = pd.concat(tables, ignore_index=True)
    examples_path = ctx.workdir / "examples.parquet"
    examples.to_parquet(examples_path, index=False)
    artifacts["examples"] = log_artifact(examples_path, "eval")
    mlflow.log_table(examples, "eval/examples.json")  # browsable in the MLflow UI
    report_path = ctx.workdir / "report.json"
    report_path.write_text(json.dumps({"split": config.split, "problems": len(problems), "metrics": results},
                                      indent=2))
    artifacts["report"] = log_artifact(report_path, "eval")
    flat = {f"eval/{name}/{k}": v for name, m in results.items() for k, v in m.items()}
    return Output(run_id=ctx.run_id, artifacts=artifacts, metrics=flat)
