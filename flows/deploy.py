"""`ufo deploy CONFIG --pool POOL [--cron EXPR | --interval SECONDS]`: register the deployments.

One deployment per stage, `ufo-stage/<stage>` (the `deployment` launcher starts them), and the
pipeline itself, `ufo-pipeline/<name>`, whose default parameters are CONFIG with
`flow.launcher: deployment`, optionally on a schedule. On a Docker or Kubernetes pool each stage
deployment runs in that stage's image (`flow.image_prefix`-<stage>:`flow.image_tag`) and the
pipeline's own flow run in the curate image (it only orchestrates: no torch needed). On a process
pool everything runs from this checkout. Entrypoints are module paths (`flows.stage_flow.ufo_stage`):
the code is already inside the image, nothing is pulled.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

from flows.config import STAGES, PipelineConfig
from flows.server import check_prefect_api, check_tracking, require_tracking_server
from stages.common.config import ConfigError, load_config
from stages.common.processes import stage_env
from stages.common.workspace import tracking_uri


def _pool_type(pool: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type
        except Exception:
            raise ConfigError(f"--pool {pool}: no such work pool on {os.environ['PREFECT_API_URL']} "
                              "(`ufo stack up --pool NAME` creates one with a worker)") from None


def image_job_variables(pool_type: str, image: str) -> dict:
    if pool_type in ("docker", "kubernetes"):
        # Images are built locally (`make images`); a registry-backed setup sets IfNotPresent/Always.
        return {"image": image, "image_pull_policy": "Never" if pool_type == "docker" else "IfNotPresent"}
    return {}


def deploy(cfg: PipelineConfig, pool: str, name: str, cron: str | None, interval: float | None,
           tracking: str) -> list[str]:
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import ufo_pipeline
    from flows.stage_flow import ufo_stage

    pool_type = _pool_type(pool)
    # Where the runs go, for flow runs the scheduler starts with nobody's environment behind them.
    env = stage_env(tracking, inherit=False)
    created = []
    for stage in STAGES:
        dep = ufo_stage.to_deployment(
            name=stage, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH,
            job_variables=image_job_variables(pool_type, cfg.flow.image(stage)) | {"env": env},
            description=f"The {stage} stage of the UFO pipeline (python -m stages.{stage}); started by the "
                        "pipeline's `deployment` launcher with the stage config as parameters.",
            tags=["ufo", stage])
        dep.apply()
        created.append(f"{cfg.flow.deployment_flow}/{stage}")
    pipeline_cfg = cfg.model_copy(update={"flow": cfg.flow.model_copy(update={"launcher": "deployment"})})
    dep = ufo_pipeline.to_deployment(
        name=name, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"config": pipeline_cfg.model_dump(mode="json")},
        job_variables=image_job_variables(pool_type, cfg.flow.image("curate")) | {"env": env},
        cron=cron, interval=timedelta(seconds=interval) if interval else None,
        description="The UFO pipeline: curate -> SFT -> multi-turn RL -> evaluate, each stage a deployment run.",
        tags=["ufo", "pipeline"])
    dep.apply()
    created.append(f"ufo-pipeline/{name}" + (f" (cron {cron})" if cron else "")
                   + (f" (every {interval:g} s)" if interval else ""))
    return created


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ufo deploy", description="Register the stage and pipeline deployments "
                                "on a Prefect work pool (PREFECT_API_URL must point at the server).")
    p.add_argument("config", help="pipeline YAML, e.g. configs/smoke.yaml")
    p.add_argument("--pool", required=True, help="work pool whose worker runs the stages")
    p.add_argument("--name", default=None, help="name of the pipeline deployment (default: the config's experiment)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", help="run the pipeline on this cron schedule, e.g. '0 3 * * *'")
    when.add_argument("--interval", type=float, help="run the pipeline every this many seconds")
    args = p.parse_args(argv)
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    if args.interval is not None and args.interval <= 0:
        raise ConfigError("--interval: must be > 0 seconds")
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise ConfigError("PREFECT_API_URL is not set: deployments live on a Prefect server "
                          "(`ufo stack up`, then `source .ufo/stack/env.sh`)")
    check_prefect_api(url)
    tracking = tracking_uri()
    require_tracking_server(tracking, "deployment")
    check_tracking(tracking)
    for line in deploy(cfg, args.pool, args.name or cfg.experiment, args.cron, args.interval, tracking):
        print(f"deployed {line}")
    print(f"run it: prefect deployment run 'ufo-pipeline/{args.name or cfg.experiment}'")
    return 0
