"""`ufo ablate SUITE.yaml`: the paper's comparisons as one command, with intervals.

A suite names a base pipeline config, seeds and arms (each a set of `rl.*` overrides). The flow curates
once (every seed and arm sees the same problems, so their outcomes pool and pair), warms up one SFT
model per seed (shared by every arm of that seed), trains every arm from it with the same budget, then
evaluates every arm and the SFT start of a seed together, with the same sampling, with and without
feedback at inference. Finally it pools the seeds and reports each arm's metrics and the paired
differences the suite asks for, with 95% bootstrap intervals over problems.

In MLflow: one ablation run (tag `ufo.kind=ablation`) holding the suite, the report and the pooled
numbers; under it the curate run, each seed's SFT and evaluate runs, and one run per arm (tag
`ufo.arm`) holding that arm's pooled metrics and, under it, its RL run for each seed. In Prefect: the
ablation flow run, with one subflow run per (arm, seed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from flows.config import PipelineConfig
from stages.common.config import ConfigError, StrictModel, apply_overrides, read_yaml, validate

KIND_ABLATION = "ablation"
TAG_ARM = "ufo.arm"
TAG_SEED = "ufo.seed"


class AblationConfig(StrictModel):
    """An ablation suite (configs/ablations/*.yaml)."""

    base: str
    """The pipeline config every arm starts from, relative to the suite file (e.g. ../tiny.yaml)."""
    set: list[str] = []
    """Overrides applied to the base for every arm, as `--set` takes them (`evaluate.num_samples=10`)."""
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    """Training seeds: one SFT warm start per seed, every arm trained from it. The data (curate) and
    hence the problems are the same for every seed, so outcomes pool over seeds."""
    arms: dict[str, list[str]] = Field(min_length=2)
    """Arm name -> its `rl.*` overrides. Arms differ only in RL: curate, SFT and evaluation are shared."""
    compare: list[tuple[str, str]] = []
    """(a, b) arm pairs whose paired difference b - a is reported (both evaluated with feedback).
    Every arm is also compared with itself without feedback at inference."""
    report_set: str = "test"
    """The evaluation set whose pooled metrics go on the ablation run and in its headline table."""

    @model_validator(mode="after")
    def _check(self) -> AblationConfig:
        for arm, overrides in self.arms.items():
            if arm in ("sft", "base") or "_vs_" in arm or arm.endswith("_no_feedback"):
                raise ValueError(f"arms.{arm}: reserved name")
            for item in overrides:
                if not item.startswith("rl."):
                    raise ValueError(f"arms.{arm}: {item!r} changes more than RL; arms share curate, SFT and "
                                     "evaluation (put shared settings under `set`)")
        for a, b in self.compare:
            for name in (a, b):
                if name not in self.arms and name not in ("sft", "base"):
                    raise ValueError(f"compare: {name!r} is not an arm ({sorted(self.arms)}) nor 'sft' or 'base' "
                                     "(the starting model, with evaluate.base)")
        return self


def load_suite(path: str | Path, overrides: list[str] | None = None) -> tuple[AblationConfig, dict[str, PipelineConfig]]:
    """The suite and each arm's full pipeline config (validated, so a bad arm fails before anything runs)."""
    path = Path(path)
    data = read_yaml(path)
    if not data:
        raise ConfigError(f"{path}: the suite is empty (see configs/ablations/paper-tiny.yaml)")
    suite = validate(AblationConfig, apply_overrides(data, list(overrides or [])), str(path))
    base_path = (path.parent / suite.base).resolve()
    base = apply_overrides(read_yaml(base_path), list(suite.set))
    # Evaluation keeps the base protocol (T turns, with and without feedback) whatever an arm trains with.
    rl = base.get("rl") or {}
    base.setdefault("evaluate", {}).setdefault("max_turns", rl.get("max_turns", 5))
    base["evaluate"].setdefault("feedback", rl.get("feedback", "Let's try again."))
    arms = {}
    for arm, arm_overrides in suite.arms.items():
        arm_data = apply_overrides(json.loads(json.dumps(base)), list(arm_overrides))
        arms[arm] = validate(PipelineConfig, arm_data, f"{path}: arms.{arm}")
    return suite, arms


def _stage_config(cfg: PipelineConfig, stage: str, seed: int, **upstream: Any) -> dict[str, Any]:
    stage_cfg = getattr(cfg, stage).model_copy(update={"seed": seed, **upstream})
    return stage_cfg.model_dump(mode="json")


def run_ablation(suite_path: str, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """The Prefect flow (defined lazily: this module is imported by the CLI before Prefect is)."""
    return _flow()(suite_path, overrides or [], force)


def _flow():
    from mlflow.tracking import MlflowClient
    from prefect import flow, get_run_logger

    from flows.pipeline import run_stage
    from flows.runs import close_run, finish_run, open_run
    from stages.common import report as rep
    from stages.common.contracts import OUTPUT_TYPES
    from stages.common.tracking import (
        TAG_KIND,
        TAG_PARENT,
        configure,
        fetch_verified,
        log_metrics,
        write_json_atomic,
    )
    from stages.common.workspace import tracking_uri, workspace

    @flow(name="ufo-arm", flow_run_name="{arm}-seed{seed}")
    def train_arm(arm: str, seed: int, rl_config: dict[str, Any], parent_run_id: str, experiment_id: str,
                  flow_config: dict[str, Any], workdir: str, use_cache: bool) -> dict[str, Any]:
        """One arm of the suite trained from one seed's warm start (its RL stage)."""
        return run_stage.with_options(task_run_name=f"rl-{arm}-seed{seed}")(
            "rl", rl_config, parent_run_id, experiment_id, flow_config, workdir, use_cache)

    @flow(name="ufo-ablation", log_prints=True)
    def ufo_ablation(suite_path: str, overrides: list[str], force: bool) -> dict[str, Any]:
        logger = get_run_logger()
        suite, arms = load_suite(suite_path, overrides)
        first = next(iter(arms.values()))
        experiment_id = configure(first.experiment)
        client = MlflowClient()
        workdir = workspace() / "ablations" / f"{int(time.time())}"
        workdir.mkdir(parents=True, exist_ok=True)
        flow_cfg = first.flow.model_dump(mode="json")
        pid = open_run(client, experiment_id, "ablation", run_name=f"ablation-{Path(suite_path).stem}",
                       tags={TAG_KIND: KIND_ABLATION, "ufo.suite": Path(suite_path).name})
        use_cache = not force
        try:
            client.log_text(pid, Path(suite_path).read_text(), "config/suite.yaml")
            for arm, cfg in arms.items():
                client.log_text(pid, cfg.model_dump_json(indent=2), f"config/arms/{arm}.json")
            arm_runs = {arm: open_run(client, experiment_id, f"arm {arm}", run_name=f"arm-{arm}", tags={
                TAG_PARENT: pid, TAG_KIND: "arm", TAG_ARM: arm,
                "mlflow.note.content": f"Arm `{arm}` of suite {Path(suite_path).name}: "
                                       + (", ".join(suite.arms[arm]) or "the base config")})
                        for arm in arms}
            data = run_stage("curate", _stage_config(first, "curate", first.curate.seed), pid, experiment_id,
                             flow_cfg, str(workdir), use_cache)
            curate_out = OUTPUT_TYPES["curate"].model_validate(data)
            examples = []
            for seed in suite.seeds:
                sft_out = OUTPUT_TYPES["sft"].model_validate(run_stage(
                    "sft", _stage_config(first, "sft", seed, data=curate_out), pid, experiment_id, flow_cfg,
                    str(workdir), use_cache))
                models = {}
                for arm, cfg in arms.items():
                    rl_out = OUTPUT_TYPES["rl"].model_validate(train_arm(
                        arm, seed, _stage_config(cfg, "rl", seed, data=curate_out, sft=sft_out), arm_runs[arm],
                        experiment_id, flow_cfg, str(workdir), use_cache))
                    models[arm] = rl_out.artifact("model").uri
                eval_cfg = first.evaluate.model_copy(update={"seed": seed, "data": curate_out, "sft": sft_out,
                                                             "models": models})
                ev = OUTPUT_TYPES["evaluate"].model_validate(run_stage(
                    "evaluate", eval_cfg.model_dump(mode="json"), pid, experiment_id, flow_cfg, str(workdir),
                    use_cache))
                examples.append(pd_read(fetch_verified(ev.artifact("examples"), workdir / f"examples-{seed}")))
                logger.info("seed %d: evaluated sft and %s", seed, ", ".join(arms))
            # Pool the seeds: one row per (problem, seed) per arm and condition; intervals over problems.
            T = first.evaluate.max_turns
            pairs = [(a, b) for a, b in suite.compare]
            starts = ["base", "sft"] if first.evaluate.base else ["sft"]
            pairs += [(rep.label(m, False), rep.label(m, True)) for m in [*starts, *arms]]
            results, comparisons = [], []
            for set_name in sorted(set(examples[0].set)):
                pooled = rep.arms_from_examples(examples, set_name, T)
                rs, cs = rep.summarise_set(set_name, pooled, pairs)
                results += rs
                comparisons += cs
            flat = rep.flat_metrics(results, comparisons)
            spread = seed_spread(examples, suite.report_set, suite.compare, T)
            flat |= spread_metrics(spread, suite.report_set)
            headline = {k: v for k, v in flat.items()
                        if k.startswith(f"eval/{suite.report_set}/") or (suite.report_set == "test" and
                                                                         k.count("/") == 2)}
            log_metrics(client, pid, headline)
            for arm, run_id in arm_runs.items():
                log_metrics(client, run_id, {k.replace(f"/{arm}/", "/", 1): v for k, v in headline.items()
                                             if f"/{arm}/" in k})
                finish_run(client, run_id)
            plots = rep.make_plots(results, comparisons, T)
            notes = [f"Seeds {suite.seeds} pooled: each problem counts once per seed; the bootstrap resamples "
                     "problems (a problem's outcomes over all seeds move together). The intervals do not "
                     "include training-seed variance beyond these seeds: the seed-to-seed spread of each "
                     "difference is listed beside it.", *paper_findings(flat, T), *spread_lines(spread)]
            html = rep.build_html(results, comparisons, max_turns=T, plots=plots,
                                  title=f"UFO ablation: {Path(suite_path).name}",
                                  meta={"ablation run": pid, "arms": "; ".join(f"{a}: {', '.join(o) or 'base'}"
                                                                               for a, o in suite.arms.items()),
                                        "seeds": str(suite.seeds), "base": suite.base}, notes=notes)
            client.log_text(pid, html, "report/ablation.html")
            for name, png in plots.items():
                (workdir / name).write_bytes(png)
                client.log_artifact(pid, str(workdir / name), "report")
            summary = {"ablation_run_id": pid, "experiment": first.experiment, "tracking_uri": tracking_uri(),
                       "arm_runs": arm_runs, "metrics": headline, "findings": paper_findings(flat, T),
                       "seed_spread": spread_lines(spread), "per_seed": spread}
            write_json_atomic(workdir / "summary.json", summary)
        except BaseException as err:
            status = "KILLED" if not isinstance(err, Exception) else "FAILED"
            for run_id in [pid, *locals().get("arm_runs", {}).values()]:
                close_run(client, run_id, status, f"{type(err).__name__}: {err}")
            raise
        finish_run(client, pid)
        return summary

    return ufo_ablation


#: The paper's numbers (arXiv 2507.14295) that the findings are read against.
PAPER = {"succ_gain": "+14% Succ@5 over single-turn RL's Pass@5",
         "ear": "effective answer ratio 79.7% -> 92.8% with the repetition penalty",
         "repeat": "about 70% of single-turn RL's failures repeat the same answer after feedback"}


def paper_findings(flat: dict[str, float], max_turns: int) -> list[str]:
    """Findings 1 and 3 in words, on the test split, both arms evaluated with feedback: UFO vs single-turn
    RL on Succ@T and the effective answer ratio (paired), and single-turn RL's repeat share, each beside
    the paper's number. Empty when the suite has no `single_turn` and `ufo` arms (or no such pair)."""
    def iv(key: str) -> str | None:
        if key not in flat:
            return None
        return f"{flat[key]:+.3f} [{flat[key + '_lo']:+.3f}, {flat[key + '_hi']:+.3f}]"

    def verdict(key: str) -> str:
        return ("interval above 0" if flat[key + "_lo"] > 0 else
                "interval below 0" if flat[key + "_hi"] < 0 else "interval includes 0")

    pair = "eval/ufo_vs_single_turn"
    out = []
    succ, ear = f"{pair}/succ_at_{max_turns}", f"{pair}/effective_answer_ratio"
    if iv(succ) is not None:
        out.append(f"Finding 1 (UFO - single-turn RL, Succ@{max_turns}, both retried with feedback): {iv(succ)}, "
                   f"{verdict(succ)}. Paper: {PAPER['succ_gain']}.")
    if iv(ear) is not None:
        out.append(f"Finding 3 (UFO - single-turn RL, effective answer ratio): {iv(ear)}, {verdict(ear)}. "
                   f"Paper: {PAPER['ear']}.")
    rep_key = "eval/single_turn/repeat_share"
    if rep_key in flat:
        out.append(f"Single-turn RL's failed episodes that repeat an earlier answer after feedback: "
                   f"{flat[rep_key]:.3f} [{flat[rep_key + '_lo']:.3f}, {flat[rep_key + '_hi']:.3f}]; UFO's: "
                   f"{flat.get('eval/ufo/repeat_share', float('nan')):.3f}. Paper: {PAPER['repeat']}.")
    stages = [(name, f"eval/{key}/repeat_share") for name, key in
              (("base model", "base"), ("after SFT", "sft"), ("after single-turn RL", "single_turn"), ("after UFO", "ufo"))]
    shown = [(name, key) for name, key in stages if key in flat]
    if len(shown) > 1:
        out.append("The paper's Figure 1, the share of failed episodes that repeat an earlier answer after "
                   "\"Let's try again.\": " + "; ".join(f"{name} {flat[key]:.3f} [{flat[key + '_lo']:.3f}, "
                                                         f"{flat[key + '_hi']:.3f}]" for name, key in shown) + ".")
    return out


#: The metrics whose paired differences get a seed-to-seed spread.
SPREAD_METRICS = ("succ_at_1", "succ_at_{T}", "pass_at_{T}", "effective_answer_ratio", "repeat_share", "avg_turns")


def seed_spread(per_seed: list, set_name: str, pairs: list[tuple[str, str]], max_turns: int,
                ) -> dict[str, dict[str, list[float]]]:
    """Each compared difference b - a estimated on every seed alone: `{"<b>_vs_<a>": {metric: [per seed]}}`.

    The pooled interval resamples problems only; how far the difference moves when only the training seed
    changes is what these show (the same problems, the same evaluation sampling seed per seed).
    """
    from stages.common import report as rep
    from stages.common.stats import ratio_of_sums

    metrics = [m.format(T=max_turns) for m in SPREAD_METRICS]
    out: dict[str, dict[str, list[float]]] = {f"{b}_vs_{a}": {m: [] for m in metrics} for a, b in pairs}
    for frame in per_seed:
        arms = {arm.label: arm for arm in rep.arms_from_examples([frame], set_name, max_turns)}
        for a, b in pairs:
            for m in metrics:
                if m in arms[a].terms and m in arms[b].terms:
                    diff = ratio_of_sums(*arms[b].terms[m]) - ratio_of_sums(*arms[a].terms[m])
                    out[f"{b}_vs_{a}"][m].append(float(diff))
    return {pair: {m: v for m, v in by.items() if v} for pair, by in out.items()}


def spread_metrics(spread: dict[str, dict[str, list[float]]], set_name: str) -> dict[str, float]:
    """`eval/<b>_vs_<a>/<metric>_seed_sd` (and `_seed_min`/`_seed_max`) beside the pooled interval."""
    prefix = "eval/" if set_name == "test" else f"eval/{set_name}/"
    out = {}
    for pair, by in spread.items():
        for m, values in by.items():
            values = [v for v in values if v == v]  # a seed without e.g. failed episodes has no repeat share
            if not values:
                continue
            out[f"{prefix}{pair}/{m}_seed_min"] = min(values)
            out[f"{prefix}{pair}/{m}_seed_max"] = max(values)
            if len(values) > 1:
                out[f"{prefix}{pair}/{m}_seed_sd"] = _sd(values)
    return out


def _sd(values: list[float]) -> float:
    """Sample standard deviation (n - 1), nan values left out."""
    import numpy as np

    v = np.array([x for x in values if x == x], dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def spread_lines(spread: dict[str, dict[str, list[float]]]) -> list[str]:
    """One line per compared pair: each metric's per-seed differences and their standard deviation."""
    lines = []
    for pair, by in spread.items():
        cells = []
        for m, values in by.items():
            sd = f", sd {_sd(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{m} " + " / ".join(f"{v:+.3f}" for v in values) + sd)
        lines.append(f"Seed by seed, {pair.replace('_vs_', ' - ')}: " + "; ".join(cells) + ".")
    return lines


def pd_read(path):
    import pandas as pd

    return pd.read_parquet(path)
