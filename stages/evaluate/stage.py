"""Evaluation (see stages/evaluate/__init__.py): every model on every eval set, metrics with bootstrap
intervals, paired differences, plots, per-example tables and one self-contained HTML report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.common import report as rep
from stages.common.chat import ChatFormat
from stages.common.config import ConfigError
from stages.common.contracts import (
    BASE_MODEL_ARTIFACT,
    EVAL_SET_PREFIX,
    ArtifactRef,
    Problem,
    load_split,
    problems_from,
)
from stages.common.episodes import Episode, rollout
from stages.common.metrics import EpisodeOutcomes, greedy_terms, multi_turn_terms, pass_at_k_terms
from stages.common.model import checkpoint_dirs, resolve_device, seed_everything
from stages.common.rollout_engines import make_engine
from stages.common.runtime import set_cpu_threads
from stages.common.tracking import StageContext, fetch_dataset, fetch_verified, log_artifact, sha256_path
from stages.evaluate.config import Config, Output

log = logging.getLogger("ufo.evaluate")


@dataclass
class ModelEval:
    """One model on one set: its multi-turn episodes per condition (feedback shown or not) and its
    single-turn results, per problem."""

    episodes: dict[bool, list[Episode]]
    """feedback shown -> episodes[p * episodes_per_problem + g]."""
    single_correct: np.ndarray
    """[P] correct answers among num_samples independent single-turn samples."""
    greedy_correct: np.ndarray
    """[P] 1 when the greedy single-turn answer is correct."""


def evaluate_model(model, tokenizer, problems: list[Problem], cfg: Config) -> ModelEval:
    """Roll out every condition of `cfg.inference`, the Pass@k samples and the greedy answer.

    Every condition starts from the same sampling seed (and every model, see `evaluate`): common random
    numbers. The first answers of the feedback and no-feedback episodes are then the same samples, so
    their paired difference measures what happens after the first wrong answer and nothing else.
    """
    model.eval()
    episodes = {}
    for condition in cfg.inference:
        seed_everything(cfg.seed)
        shown = condition == "feedback"
        # Without feedback the wrong answer is followed by an empty user turn: same protocol, no signal.
        fmt = ChatFormat(tokenizer, cfg.feedback if shown else "")
        episodes[shown] = rollout(model, fmt, problems, group_size=cfg.episodes_per_problem,
                                  max_turns=cfg.max_turns, temperature=cfg.temperature,
                                  max_new_tokens=cfg.max_new_tokens, engine=_engine(cfg, model, fmt))
    fmt = ChatFormat(tokenizer, cfg.feedback)
    n = cfg.num_samples
    singles = rollout(model, fmt, problems, group_size=n, max_turns=1, temperature=cfg.temperature,
                      max_new_tokens=cfg.max_new_tokens, engine=_engine(cfg, model, fmt))
    single_correct = np.array([e.solved_turn == 0 for e in singles]).reshape(len(problems), n).sum(axis=1)
    greedy = rollout(model, fmt, problems, group_size=1, max_turns=1, temperature=0.0,
                     max_new_tokens=cfg.max_new_tokens, engine=_engine(cfg, model, fmt))
    return ModelEval(episodes, single_correct, np.array([e.solved_turn == 0 for e in greedy], dtype=np.int64))


def _engine(cfg: Config, model, fmt: ChatFormat):
    return make_engine(cfg.rollout_engine, model, eos_id=fmt.eos_id, pad_id=fmt.pad_id)


def model_arms(name: str, ev: ModelEval, cfg: Config) -> list[rep.Arm]:
    """The model's metric terms per condition; single-turn metrics go with the feedback condition (they
    do not depend on it)."""
    arms = []
    for shown, episodes in ev.episodes.items():
        terms = multi_turn_terms(EpisodeOutcomes.from_episodes(episodes, cfg.episodes_per_problem), cfg.max_turns)
        if shown or "feedback" not in cfg.inference:
            terms |= pass_at_k_terms(ev.single_correct, cfg.num_samples, cfg.max_turns)
            terms |= greedy_terms(ev.greedy_correct)
        arms.append(rep.Arm(name, shown, terms))
    return arms


def comparison_pairs(models: list[str], cfg: Config) -> list[tuple[str, str]]:
    """(a, b) label pairs, reported as b - a: every later model against every earlier one (with feedback
    when evaluated with it), and each model with feedback against itself without."""
    shown = "feedback" in cfg.inference
    pairs = [(rep.label(a, shown), rep.label(b, shown)) for i, a in enumerate(models) for b in models[i + 1:]]
    if len(cfg.inference) == 2:
        pairs += [(rep.label(m, False), rep.label(m, True)) for m in models]
    return pairs


def example_rows(set_name: str, name: str, ev: ModelEval, cfg: Config) -> pd.DataFrame:
    """One row per episode: what a reader scans first (model, condition, outcome, graded answers), then the
    question, then the columns `report.arms_from_examples` rebuilds the metrics from."""
    g = cfg.episodes_per_problem
    rows = []
    for shown, episodes in ev.episodes.items():
        for i, e in enumerate(episodes):
            p = i // g
            rows.append({
                "model": name, "feedback": shown, "set": set_name, "id": e.problem.id, "episode": i % g,
                "solved_turn": -1 if e.solved_turn is None else e.solved_turn,
                "graded": " ".join(("✓" if t.correct else "∅" if t.answer is None else "✗") + f"{t.answer}"
                                   for t in e.turns),
                "question": e.problem.question, "gold": e.problem.answer,
                "num_turns": e.num_turns, "num_valid": e.num_turns - e.num_invalid, "num_distinct": e.num_distinct,
                "single_correct": int(ev.single_correct[p]), "num_samples": cfg.num_samples,
                "greedy_correct": int(ev.greedy_correct[p]),
                "attempts": json.dumps([{"reply": t.reply, "answer": t.answer, "correct": t.correct}
                                        for t in e.turns]),
            })
    return pd.DataFrame(rows)


def pick_transcripts(examples: pd.DataFrame, set_name: str, cfg: Config) -> list[rep.Transcript]:
    """Up to `cfg.transcripts` problems of a set, preferring those where an episode took several turns
    (where feedback matters), each shown for every model and condition (first episode only)."""
    df = examples[(examples.set == set_name) & (examples.episode == 0)]
    multi = df.groupby("id", sort=False).num_turns.max() > 1
    ids = list(multi[multi].index[: cfg.transcripts])
    ids += list(multi[~multi].index[: cfg.transcripts - len(ids)])
    out = []
    for pid in ids:
        for row in df[df.id == pid].itertuples():
            attempts = [rep.Attempt(a["reply"], a["answer"], a["correct"]) for a in json.loads(row.attempts)]
            out.append(rep.Transcript(set_name, rep.label(row.model, row.feedback), pid, row.question, row.gold,
                                      cfg.feedback if row.feedback else "", attempts))
    return out


# --- models -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    model_dir: Path
    tokenizer_dir: Path
    sha256: str
    """Digest of the downloaded folder: what was evaluated."""


def fetch_model(source: ArtifactRef | str, dst: Path) -> Checkpoint:
    """Download a model: a pipeline Output's model is digest-checked; a model URI from the config is
    downloaded as it is and its digest recorded."""
    if isinstance(source, ArtifactRef):
        folder = fetch_verified(source, dst)
    else:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))
        except Exception as err:
            raise ConfigError(f"evaluate.models: cannot download {source!r}: {type(err).__name__}: {err}") from err
    return Checkpoint(*checkpoint_dirs(folder), sha256_path(folder))


def load_checkpoint(ckpt: Checkpoint, device: torch.device):
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(ckpt.model_dir), dtype=torch.float32).to(device)
    return model, tokenizer


# --- the stage --------------------------------------------------------------------------------------------


def eval_sets(config: Config, ctx: StageContext) -> dict[str, list[Problem]]:
    available = config.data.eval_sets()
    if not available:
        raise ConfigError("evaluate.data: the curate output has no evaluation set (neither a `test` split nor "
                          "an `eval/<name>` set)")
    names = config.sets if config.sets is not None else list(available)
    unknown = [s for s in names if s not in available]
    if unknown:
        raise ConfigError(f"evaluate.sets: {unknown} not in the curate output; it has {sorted(available)}")
    return {s: problems_from(load_split(fetch_dataset(available[s], ctx.workdir / "sets" / s, context="evaluation",
                                                      name=s if s == "test" else EVAL_SET_PREFIX + s)))
            [: config.max_problems] for s in names}


def evaluate(config: Config, ctx: StageContext) -> Output:
    if config.data is None:
        raise ConfigError("evaluate.data: the curate stage's Output is required (the flow sets it)")
    sources: dict[str, ArtifactRef | str] = {}
    if config.base:
        if config.sft is None or BASE_MODEL_ARTIFACT not in config.sft.artifacts:
            raise ConfigError("evaluate.base: the SFT Output has no `base_model` (only a pretrained start, "
                              "sft.model.init 'pretrained' or 'gguf', has one)")
        sources["base"] = config.sft.artifact(BASE_MODEL_ARTIFACT)
    sources |= {name: out.artifact("model") for name, out in (("sft", config.sft), ("rl", config.rl))
                if out is not None}
    sources |= config.models
    if not sources:
        raise ConfigError("evaluate.sft / evaluate.rl / evaluate.models: give at least one model to evaluate")
    set_cpu_threads()
    device = resolve_device(config.device)
    sets = eval_sets(config, ctx)
    clash = [s for s in sets if s != rep.DEFAULT_SET and any(s in (m, rep.label(m, False)) for m in sources)]
    if clash:
        raise ConfigError(f"evaluate.sets: set name(s) {clash} equal a model name; metric names would be ambiguous")

    # Every model is downloaded and checked before any is evaluated: a bad URI fails in seconds.
    checkpoints = {name: fetch_model(source, ctx.workdir / "models" / name) for name, source in sources.items()}
    evals: dict[str, dict[str, ModelEval]] = {s: {} for s in sets}
    for name, ckpt in checkpoints.items():
        mlflow.log_param(f"models.{name}.sha256", ckpt.sha256)
        model, tokenizer = load_checkpoint(ckpt, device)
        t0 = time.time()
        for set_name, problems in sets.items():
            evals[set_name][name] = evaluate_model(model, tokenizer, problems, config)
        mlflow.log_metric(f"perf/eval_{name}_seconds", time.time() - t0)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model gets the memory back

    t0 = time.time()
    results, comparisons, examples, transcripts = [], [], [], []
    for set_name, by_model in evals.items():
        arms = [arm for name, ev in by_model.items() for arm in model_arms(name, ev, config)]
        rs, cs = rep.summarise_set(set_name, arms, comparison_pairs(list(by_model), config),
                                   n_boot=config.bootstrap_samples, level=config.interval_level,
                                   seed=config.seed, resampling=config.resampling)
        results += rs
        comparisons += cs
        examples += [example_rows(set_name, name, ev, config) for name, ev in by_model.items()]
        for r in rs:
            shown = " ".join(f"{m}={iv.fmt()}" for m, iv in r.metrics.items()
                             if m in ("succ_at_1", f"succ_at_{config.max_turns}", "effective_answer_ratio"))
            log.info("%s / %s: %s", set_name, r.label, shown)
    table = pd.concat(examples, ignore_index=True)
    for set_name in sets:
        transcripts += pick_transcripts(table, set_name, config)
    metrics = rep.flat_metrics(results, comparisons)
    mlflow.log_metrics(metrics)

    artifacts = log_outputs(config, ctx, sets, results, comparisons, table, transcripts)
    mlflow.log_metric("perf/eval_report_seconds", time.time() - t0)
    mlflow.set_tag("mlflow.note.content", run_description(config, sets, list(sources), results))
    return Output(run_id=ctx.run_id, artifacts=artifacts, metrics=metrics)


def log_outputs(config: Config, ctx: StageContext, sets: dict[str, list[Problem]], results, comparisons,
                table: pd.DataFrame, transcripts) -> dict[str, ArtifactRef]:
    """Plots, the HTML and JSON reports, the per-episode parquet and one MLflow table per model and set."""
    plots = rep.make_plots(results, comparisons, config.max_turns)
    plot_dir = ctx.workdir / "plots"
    plot_dir.mkdir()
    for name, png in plots.items():
        (plot_dir / name).write_bytes(png)
    artifacts = {"plots": log_artifact(plot_dir, "eval/plots")}
    first = next(iter(sets))
    curves = plot_dir / f"curves_{first}.png"
    artifacts["curves"] = ArtifactRef(uri=f"{artifacts['plots'].uri}/{curves.name}", sha256=sha256_path(curves))

    meta = {"MLflow run": ctx.run_id, "models": ", ".join(dict.fromkeys(r.model for r in results)),
            "eval sets": ", ".join(f"{s} ({len(p)} problems)" for s, p in sets.items()),
            "protocol": f"T = {config.max_turns} turns, feedback {config.feedback!r} "
                        f"(conditions: {', '.join(config.inference)}), temperature {config.temperature}, "
                        f"{config.episodes_per_problem} episode(s) per problem, Pass@k from "
                        f"{config.num_samples} samples, sampling seed {config.seed}",
            "intervals": f"{config.interval_level:.0%} percentile bootstrap, {config.bootstrap_samples} "
                         f"resamples of problems ({config.resampling})"}
    html_path = ctx.workdir / "report.html"
    html_path.write_text(rep.build_html(results, comparisons, max_turns=config.max_turns, plots=plots,
                                        transcripts=transcripts, meta=meta), encoding="utf-8")
    artifacts["report_html"] = log_artifact(html_path, "eval")

    json_path = ctx.workdir / "report.json"
    json_path.write_text(json.dumps({
        "meta": meta, "max_turns": config.max_turns,
        "results": [{"set": r.set, "model": r.model, "feedback": r.feedback, "label": r.label, "problems": r.problems,
                     "seeds": r.seeds, "metrics": {m: _iv(iv) for m, iv in r.metrics.items()}} for r in results],
        "comparisons": [{"set": c.set, "a": c.a, "b": c.b, "metrics": {m: _iv(iv) for m, iv in c.metrics.items()}}
                        for c in comparisons],
    }, indent=1, allow_nan=True))
    artifacts["report"] = log_artifact(json_path, "eval")

    parquet = ctx.workdir / "examples.parquet"
    table.to_parquet(parquet, index=False)
    artifacts["examples"] = log_artifact(parquet, "eval")
    # One table per model and set, so the model is in the name rather than an off-screen column.
    for (set_name, model, shown), df in table.groupby(["set", "model", "feedback"], sort=False):
        mlflow.log_table(df.drop(columns=["set", "model", "feedback", "attempts"]),
                         f"eval/tables/{set_name}/{rep.label(model, shown)}.json")
    return artifacts


def _iv(iv) -> dict[str, float]:
    return {"estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi, "level": iv.level}


def run_description(config: Config, sets, models: list[str], results) -> str:
    """The evaluate run's description in the MLflow UI: what was evaluated, the headline numbers, and how
    the metrics are named."""
    T = config.max_turns
    lines = [f"**Evaluation** of {', '.join(models)} on {', '.join(sets)}, T = {T}.", "",
             "| set | model | Succ@1 | Succ@T | Pass@T | effective answer ratio |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = [r.metrics[m].fmt() if m in r.metrics else "—"
                 for m in ("succ_at_1", f"succ_at_{T}", f"pass_at_{T}", "effective_answer_ratio")]
        lines.append(f"| {r.set} | {r.label} | " + " | ".join(cells) + " |")
    lines += ["", "Metric names: `eval/<model>/<metric>` on the test split, `eval/<set>/<model>/<metric>` on other "
              "sets; `<model>_no_feedback` = episodes without feedback at inference; `<b>_vs_<a>` = paired "
              "difference b - a; `_lo`/`_hi` = the interval. Full report: artifact `eval/report.html`."]
    return "\n".join(lines)
