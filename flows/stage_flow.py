"""One stage as a Prefect flow: what the per-stage deployments run (`ufo deploy`), under a work pool's
worker (a local process, a Docker container of the stage's image, a Kubernetes Job).

It runs the stage exactly as the local launcher does, `python -m stages.<name>`, into the MLflow run
the pipeline created for it, and fails the flow run when the stage fails. It refuses to run stage
code other than what the pipeline keyed its cache on (a stale image).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.cache import code_digest as local_code_digest
from stages.common.processes import REPO_ROOT, describe_exit, spawn, stage_command, stage_env, watch


class StageProcessFailed(RuntimeError):
    pass


@flow(name="ufo-stage", flow_run_name="{stage}-{run_id}")
def ufo_stage(stage: str, config: dict[str, Any], run_id: str, parent_run_id: str,
              code_digest: str | None = None, grace_seconds: float = 10.0) -> None:
    """Run `stage` with `config`, logging into MLflow run `run_id` (a child of `parent_run_id`)."""
    logger = get_run_logger()
    here = local_code_digest(stage)
    if code_digest and code_digest != here:
        raise StageProcessFailed(f"this image/checkout has {stage} code {here[:12]}, the pipeline expects "
                                 f"{code_digest[:12]}: rebuild the images (`make images`) and redeploy")
    logger.info("$ python -m stages.%s --run-id %s", stage, run_id)
    child = spawn(stage_command(stage, config=config, run_id=run_id, parent_run_id=parent_run_id), env=stage_env(),
                  cwd=REPO_ROOT)
    # No timeout of its own: the pipeline's launcher times the flow run out and cancels it.
    outcome = watch(child, lambda line: logger.info("[%s] %s", stage, line), timeout_seconds=None,
                    grace_seconds=grace_seconds)
    if outcome.returncode != 0:
        raise StageProcessFailed(f"stage {stage} {describe_exit(outcome.returncode)}")
