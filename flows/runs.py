"""The flow's side of MLflow: it creates each stage's run before launching the stage, closes the run
itself when the stage could not (a crash, a timeout, an interrupt), and finds cached results.

Stages open the run they are given (`--run-id`) and end it FINISHED, FAILED or KILLED themselves
whenever they can; the flow only steps in for a run still RUNNING after its process is gone, so no
run is ever left RUNNING by a dead stage.
"""

from __future__ import annotations

import logging
import time

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from flows.cache import TAG_CACHE_HIT, TAG_CACHE_KEY, TAG_CACHE_SOURCE, TAG_CODE
from stages.common.contracts import OUTPUT_TYPES, StageOutput
from stages.common.tracking import OUTPUT_ARTIFACT, TAG_FAILURE, TAG_PARENT, TAG_STAGE

log = logging.getLogger("ufo.flow")
TAG_ATTEMPT = "ufo.attempt"
TAG_LAUNCHER = "ufo.launcher"


def create_stage_run(client: MlflowClient, experiment_id: str, stage: str, parent_run_id: str, *,
                     attempt: int, key: str, code: str, launcher: str) -> str:
    """A RUNNING child run for one attempt of `stage`; the stage process logs into it."""
    run = client.create_run(experiment_id, run_name=stage if attempt == 1 else f"{stage} (attempt {attempt})",
                            tags={TAG_STAGE: stage, TAG_PARENT: parent_run_id, TAG_ATTEMPT: str(attempt),
                                  TAG_CACHE_KEY: key, TAG_CODE: code, TAG_LAUNCHER: launcher})
    return run.info.run_id


def close_run(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    """End `run_id` with `status` (FAILED or KILLED) and `reason`, unless it finished.

    The flow's verdict wins: only it knows that the SIGTERM a stage saw was a timeout (FAILED) and
    not a user's Ctrl-C (KILLED). What the stage recorded itself is kept after the flow's reason.
    Never raises: it runs while handling a failure.
    """
    try:
        run = client.get_run(run_id)
        if run.info.status == "FINISHED":
            return
        if run.info.status != status:
            client.set_terminated(run_id, status)
        own = run.data.tags.get(TAG_FAILURE)
        client.set_tag(run_id, TAG_FAILURE, (reason if not own or own == reason else
                                             f"{reason}; the stage recorded: {own}")[:4000])
    except Exception as err:
        log.warning("could not close MLflow run %s as %s: %s", run_id, status, err)


def read_stage_output(client: MlflowClient, stage: str, run_id: str) -> StageOutput:
    """The Output a FINISHED stage run logged; an error naming the run if it is missing."""
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        raise RuntimeError(f"stage {stage} exited 0 but its MLflow run {run_id} is {status}")
    local = client.download_artifacts(run_id, OUTPUT_ARTIFACT)
    return OUTPUT_TYPES[stage].model_validate_json(open(local).read())


def find_cached(client: MlflowClient, experiment_id: str, stage: str, key: str) -> StageOutput | None:
    """The newest FINISHED run of `stage` with cache key `key` (not itself a cache-hit record)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_CACHE_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if run.data.tags.get(TAG_CACHE_HIT) == "true" or run.data.tags.get(TAG_STAGE) != stage:
            continue
        try:
            return read_stage_output(client, stage, run.info.run_id)
        except Exception as err:  # artifacts deleted, say: not a usable hit
            log.warning("cache: run %s has key %s but its output is unreadable (%s); ignoring it",
                        run.info.run_id, key[:12], err)
    return None


def record_cache_hit(client: MlflowClient, experiment_id: str, stage: str, parent_run_id: str, key: str,
                     output: StageOutput) -> str:
    """A FINISHED child run saying: this stage's result is the one of run `output.run_id`."""
    run = client.create_run(experiment_id, run_name=f"{stage} (cached)", tags={
        TAG_STAGE: stage, TAG_PARENT: parent_run_id, TAG_CACHE_KEY: key, TAG_CACHE_HIT: "true",
        TAG_CACHE_SOURCE: output.run_id,
        "mlflow.note.content": f"Cache hit: this stage's result is run {output.run_id} (same config, "
                               "inputs and code); nothing was recomputed."})
    client.log_text(run.info.run_id, output.model_dump_json(indent=2), OUTPUT_ARTIFACT)
    if output.metrics:  # the headline numbers, so the cached row in the UI is not blank
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in output.metrics.items()])
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run.info.run_id
