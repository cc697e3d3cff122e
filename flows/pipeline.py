"""The Prefect flow: curate -> SFT -> RL -> evaluate, each stage launched by `flow.launcher`.

The flow opens the MLflow pipeline run (tagged `ufo.kind=pipeline`) and, for every stage attempt, a
RUNNING child run that the stage logs into. Between stages only small typed Outputs travel (run
ids, artifact URIs, digests), read back from each stage run's `ufo/output.json`. A stage whose
result is already in MLflow (same cache key) is not run again. Whatever happens — a crash, a
timeout, a SIGKILL, a Ctrl-C — every run the flow opened ends FINISHED, FAILED or KILLED, never
left RUNNING, with the reason in the tag `ufo.failure`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from flows.cache import cache_key, code_digest
from flows.config import STAGES, UPSTREAM, FlowConfig, PipelineConfig
from flows.launchers import StageJob, make_launcher
from flows.registry import CHAMPION_MODEL, Decision, champion_to_evaluate, gate
from flows.runs import (
    close_run,
    create_stage_run,
    find_cached,
    finish_run,
    open_run,
    read_stage_output,
    record_cache_hit,
)
from stages.common.config import dump_yaml
from stages.common.contracts import OUTPUT_TYPES, StageOutput
from stages.common.runtime import bound_tracking_retries, check_stop, load_secrets_file
from stages.common.tracking import TAG_KIND, configure, write_json_atomic
from stages.common.workspace import tracking_uri, workspace

TAG_REUSED = "ufo.reused."


class StageFailed(RuntimeError):
    pass


def _interrupted(err: BaseException) -> bool:
    """KeyboardInterrupt, SIGTERM (ours or Prefect's TerminationSignal): the user stopped the run."""
    return not isinstance(err, Exception)


#: What the pipeline run shows (the evaluate run has everything): per model and evaluation set, the
#: paper's metrics with their 95% interval ends.
#: With the registry gate on, also the current champion's and the paired difference champion - rl.
HEADLINE = re.compile(r"^eval/(?:[^/]+/)?(base|sft|rl|champion|champion_vs_rl|rl_vs_sft|sft_vs_base|rl_vs_base)/(succ_at_\d+|pass_at_\d+|avg_turns|"
                      r"effective_answer_ratio|invalid_rate|greedy_accuracy|repeat_share)(_lo|_hi)?$")


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in sorted(metrics.items()) if HEADLINE.match(k)}


def describe_pipeline(cfg: PipelineConfig, outputs: dict[str, StageOutput], metrics: dict[str, float]) -> str:
    """The pipeline run's description in the MLflow UI (markdown): its stages, their runs, the numbers."""
    lines = [f"**UFO pipeline** ({cfg.flow.launcher} launcher): curate -> SFT -> multi-turn RL -> evaluate. "
             "Config: `config/pipeline.yaml`; each stage's Output: `outputs/<stage>.json`.", "",
             "| stage | MLflow run |", "|---|---|"]
    lines += [f"| {name} | `{out.run_id}` |" for name, out in outputs.items()]
    T = cfg.evaluate.max_turns
    models = ("base", "sft", "rl") if cfg.evaluate.base else ("sft", "rl")
    rows = [(m, f"succ_at_{T}", f"pass_at_{T}", "effective_answer_ratio", "avg_turns", "repeat_share")
            for m in models]
    lines += ["", f"| model | Succ@{T} | Pass@{T} | effective answer ratio | average turns | repeat share |",
              "|---|---|---|---|---|---|"]
    for model, *names in rows:
        cells = []
        for n in names:
            v, lo, hi = (metrics.get(f"eval/{model}/{n}{suffix}") for suffix in ("", "_lo", "_hi"))
            cells.append("" if v is None else f"{v:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]"))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, stage_config: dict[str, Any], parent_run_id: str, experiment_id: str,
              flow_config: dict[str, Any], workdir: str, use_cache: bool = True) -> dict[str, Any]:
    """Run one stage (or take its cached result); return its Output as a dict, or raise StageFailed."""
    check_stop()
    logger = get_run_logger()
    flow_cfg = FlowConfig.model_validate(flow_config)
    settings = flow_cfg.stage(stage)
    client = MlflowClient()
    code = code_digest(stage)
    key = cache_key(stage, stage_config, code)
    if use_cache and settings.cache:
        cached = find_cached(client, experiment_id, stage, key)
        if cached is not None:
            record = record_cache_hit(client, experiment_id, stage, parent_run_id, key, cached)
            logger.info("%s: cache hit (key %s): reusing run %s, recorded as run %s", stage, key[:12],
                        cached.run_id, record)
            return cached.model_dump(mode="json")
    launcher = make_launcher(flow_cfg, tracking_uri())
    attempt = task_run.run_count or 1
    run_id = create_stage_run(client, experiment_id, stage, parent_run_id, attempt=attempt, key=key, code=code,
                              launcher=launcher.name)
    job = StageJob(stage, stage_config, run_id, parent_run_id, Path(workdir), flow_cfg.timeout(stage),
                   flow_cfg.stop_grace_seconds, settings.resources)
    try:
        result = launcher.launch(job, logger.info)
    except BaseException as err:
        if _interrupted(err):
            close_run(client, run_id, "KILLED", f"interrupted: {type(err).__name__}")
        else:
            close_run(client, run_id, "FAILED", f"launcher error: {type(err).__name__}: {err}")
        raise
    if result.ok:
        try:
            return read_stage_output(client, stage, run_id).model_dump(mode="json")
        except Exception as err:
            close_run(client, run_id, "FAILED", f"no usable output: {err}")
            raise StageFailed(f"stage {stage}: {err}") from None
    close_run(client, run_id, "FAILED", f"stage process {result.failure}")
    last = "\n  ".join(result.tail)
    raise StageFailed(f"stage {stage} {result.failure}; last output:\n  {last}")


@task(cache_policy=NO_CACHE, task_run_name="registry-gate")
def registry_gate(cfg: PipelineConfig, rl: StageOutput, evaluation: StageOutput,
                  champion_evaluated: str | None) -> Decision:
    """Register the RL model as `candidate`; make it `champion` if it beats the current one (flows/registry.py)."""
    decision = gate(MlflowClient(), cfg, rl, evaluation.metrics, champion_evaluated)
    get_run_logger().info("registry: %s version %s %s. %s", decision.name, decision.version, decision.status,
                          decision.reason)
    return decision


@flow(name="ufo-pipeline", log_prints=True)
def ufo_pipeline(config: dict[str, Any], reuse: dict[str, dict[str, Any]] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Run the UFO pipeline.

    Args:
        config: a PipelineConfig as a dict (validated again here).
        reuse: stage name -> an earlier Output to use instead of running that stage (`--from-run`).
        force: run every stage even when the cache holds its result.
    """
    logger = get_run_logger()
    cfg = PipelineConfig.model_validate(config)
    reuse = reuse or {}
    load_secrets_file()  # a deployment's flow run in a container: the credentials its pool mounted
    bound_tracking_retries(cfg.flow.tracking_retry_seconds)  # inherited by the stage processes started here
    experiment_id = configure(cfg.experiment)
    client = MlflowClient()
    flow_run_id = str(flow_run.get_id() or "local")
    workdir = workspace() / "runs" / flow_run_id
    workdir.mkdir(parents=True, exist_ok=True)
    pid = open_run(client, experiment_id, "pipeline", run_name=f"pipeline-{flow_run.get_name() or 'local'}",
                   tags={TAG_KIND: "pipeline", "prefect.flow_run_id": flow_run_id, "ufo.launcher": cfg.flow.launcher})
    logger.info("MLflow pipeline run %s (tracking %s)", pid, tracking_uri())
    try:
        client.log_text(pid, dump_yaml(cfg), "config/pipeline.yaml")
        outputs: dict[str, StageOutput] = {}
        champion: dict[str, str] = {}
        for name in STAGES:
            stage_cfg = getattr(cfg, name).model_copy(update={f: outputs[src] for f, src in UPSTREAM[name].items()})
            if name == "evaluate" and cfg.flow.registry.enabled and name not in reuse:
                # The current champion is evaluated beside RL on the same problems: the gate needs the pair.
                champion = champion_to_evaluate(client, cfg, outputs["rl"])
                stage_cfg.models = {**stage_cfg.models, **champion}
            if name in reuse:
                out = OUTPUT_TYPES[name].model_validate(reuse[name])
                logger.info("%s: reusing run %s", name, out.run_id)
                client.set_tag(pid, TAG_REUSED + name, out.run_id)
            else:
                settings = cfg.flow.stage(name)
                raw = run_stage.with_options(retries=settings.retries,
                                             retry_delay_seconds=cfg.flow.retry_delay_seconds)(
                    name, stage_cfg.model_dump(mode="json"), pid, experiment_id, cfg.flow.model_dump(mode="json"),
                    str(workdir), use_cache=not force)
                out = OUTPUT_TYPES[name].model_validate(raw)
            outputs[name] = out
            client.log_dict(pid, out.model_dump(mode="json"), f"outputs/{name}.json")
        metrics = headline_metrics(outputs["evaluate"].metrics)
        now = int(time.time() * 1000)
        client.log_batch(pid, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        description = describe_pipeline(cfg, outputs, metrics)
        summary = {"pipeline_run_id": pid, "experiment": cfg.experiment, "tracking_uri": tracking_uri(),
                   "stages": {n: o.run_id for n, o in outputs.items()}, "metrics": metrics}
        if cfg.flow.registry.enabled:
            decision = registry_gate(cfg, outputs["rl"], outputs["evaluate"], champion.get(CHAMPION_MODEL))
            client.log_batch(pid, tags=[RunTag(k, v) for k, v in decision.tags().items()])
            description += "\n\n" + decision.markdown()
            summary["registry"] = decision.tags()
        client.set_tag(pid, "mlflow.note.content", description)
        write_json_atomic(workdir / "summary.json", summary)
    except BaseException as err:
        status = "KILLED" if _interrupted(err) else "FAILED"
        close_run(client, pid, status, f"{type(err).__name__}: {err}")
        raise
    finish_run(client, pid)
    return summary
