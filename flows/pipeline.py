"""The Prefect flow: curate -> SFT -> RL -> evaluate, each stage its own process.

Each stage runs as `python -m stages.<name> --config ... --output ...` (the command its container
runs), its output streamed into the Prefect logs. The flow opens the MLflow pipeline run (tagged
`ufo.kind=pipeline`); each stage opens a child run. Between stages only small typed Outputs travel
(run ids, artifact URIs, digests).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.config import STAGES, PipelineConfig
from stages import curate, evaluate, rl, sft
from stages.common.config import dump_yaml
from stages.common.tracking import TAG_KIND, StageOutput, configure, workspace, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_TYPES: dict[str, type[StageOutput]] = {
    "curate": curate.Output, "sft": sft.Output, "rl": rl.Output, "evaluate": evaluate.Output,
}


class StageFailed(RuntimeError):
    pass


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Progress bars are noise in a log stream.
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TQDM_DISABLE", "1")
    return env


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def run_stage(name: str, stage_config: dict[str, Any], parent_run_id: str, workdir: str,
              timeout_s: float | None = None) -> dict[str, Any]:
    """Run one stage as a subprocess; return its Output (as a dict) or raise StageFailed."""
    logger = get_run_logger()
    wd = Path(workdir)
    cfg_path, out_path = wd / f"{name}.config.json", wd / f"{name}.output.json"
    write_json_atomic(cfg_path, stage_config)
    out_path.unlink(missing_ok=True)  # a retry must never pick up an earlier attempt's output
    cmd = [sys.executable, "-m", f"stages.{name}", "--config", str(cfg_path), "--output", str(out_path),
           "--parent-run-id", parent_run_id]
    logger.info("$ %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=20)
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=stage_env(), cwd=REPO_ROOT)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("[%s] %s", name, line)
            if timeout_s and time.time() - start > timeout_s:
                proc.kill()
                raise StageFailed(f"stage {name} ran longer than {timeout_s} s and was killed")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    if rc != 0:
        last = "\n  ".join(tail)
        raise StageFailed(f"stage {name} exited with code {rc}; last output:\n  {last}")
    return json.loads(out_path.read_text())


def _stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in STAGES}


@flow(name="ufo-pipeline", log_prints=True)
def ufo_pipeline(config: dict[str, Any], reuse: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the UFO pipeline. `reuse` maps stage name -> an earlier Output to use instead of running it."""
    logger = get_run_logger()
    cfg = PipelineConfig.model_validate(config)
    reuse = reuse or {}
    configure(cfg.experiment)
    flow_run_id = str(flow_run.get_id() or "local")
    workdir = workspace() / "runs" / flow_run_id
    workdir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, StageOutput] = {}
    tags = {TAG_KIND: "pipeline", "prefect.flow_run_id": flow_run_id}
    with mlflow.start_run(run_name=f"pipeline-{flow_run.get_name() or 'local'}", tags=tags) as parent:
        pid = parent.info.run_id
        logger.info("MLflow pipeline run %s (tracking %s)", pid, mlflow.get_tracking_uri())
        mlflow.log_text(dump_yaml(cfg), "config/pipeline.yaml")
        stage_cfgs = _stage_configs(cfg)
        for name in STAGES:
            stage_cfg = stage_cfgs[name]
            upstream = {"sft": {"data": "curate"}, "rl": {"data": "curate", "sft": "sft"},
                        "evaluate": {"data": "curate", "sft": "sft", "rl": "rl"}}.get(name, {})
            stage_cfg = stage_cfg.model_copy(update={f: outputs[src] for f, src in upstream.items()})
            if name in reuse:
                out = OUTPUT_TYPES[name].model_validate(reuse[name])
                logger.info("%s: reusing run %s", name, out.run_id)
                mlflow.set_tag(f"ufo.reused.{name}", out.run_id)
            else:
                retries = getattr(cfg.flow.retries, name)
                raw = run_stage.with_options(retries=retries, retry_delay_seconds=cfg.flow.retry_delay_seconds)(
                    name, stage_cfg.model_dump(mode="json"), pid, str(workdir), cfg.flow.stage_timeout_seconds)
                out = OUTPUT_TYPES[name].model_validate(raw)
            outputs[name] = out
            mlflow.log_dict(out.model_dump(mode="json"), f"outputs/{name}.json")
        summary = {"pipeline_run_id": pid, "experiment": cfg.experiment, "tracking_uri": mlflow.get_tracking_uri(),
                   "stages": {n: o.run_id for n, o in outputs.items()},
                   "metrics": outputs["evaluate"].metrics}
        write_json_atomic(workdir / "summary.json", summary)
    return summary
