"""The flow's side of MLflow: it creates each stage's run before launching the stage, closes the run
itself when the stage could not (a crash, a timeout, an interrupt), and finds cached results.

Stages open the run they are given (`--run-id`) and end it FINISHED, FAILED or KILLED themselves
whenever they can; the flow only steps in for a run still RUNNING after its process is gone, so no
run is ever left RUNNING by a dead stage.

While the tracking server is down nobody can close a run. The runs this process could not close are
written to a journal in the workspace (`runs/unclosed.json`, per tracking URI), and the next `ufo`
command (or `ufo stack`) that reaches the server closes them (`close_journaled`), with the reason in
`ufo.failure`. `settle` says which runs this process closed and which it could not.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from flows.cache import TAG_CACHE_HIT, TAG_CACHE_KEY, TAG_CACHE_SOURCE, TAG_CODE
from flows.server import file_lock
from stages.common.contracts import OUTPUT_TYPES, StageOutput
from stages.common.tracking import OUTPUT_ARTIFACT, TAG_FAILURE, TAG_PARENT, TAG_STAGE, tracking_server_down
from stages.common.workspace import unclosed_runs_journal

log = logging.getLogger("ufo.flow")
TAG_ATTEMPT = "ufo.attempt"
TAG_LAUNCHER = "ufo.launcher"


@dataclass
class Ledger:
    """What this process did to the runs it opened (for `settle`)."""

    opened: dict[str, str] = field(default_factory=dict)
    """run id -> what it is (`pipeline`, a stage name, ...)."""
    ended: dict[str, str] = field(default_factory=dict)
    """run id -> the status the server confirmed it ended with."""
    unclosed: dict[str, tuple[str, str]] = field(default_factory=dict)
    """run id -> (the status it should get, why): runs it could not close."""


LEDGER = Ledger()


def open_run(client: MlflowClient, experiment_id: str, what: str, **kwargs) -> str:
    """`client.create_run(...)`, remembered as opened by this process; returns the run id."""
    run_id = client.create_run(experiment_id, **kwargs).info.run_id
    LEDGER.opened[run_id] = what
    return run_id


def finish_run(client: MlflowClient, run_id: str) -> None:
    client.set_terminated(run_id, "FINISHED")
    LEDGER.ended[run_id] = "FINISHED"


def create_stage_run(client: MlflowClient, experiment_id: str, stage: str, parent_run_id: str, *,
                     attempt: int, key: str, code: str, launcher: str) -> str:
    """A RUNNING child run for one attempt of `stage`; the stage process logs into it."""
    return open_run(client, experiment_id, stage, run_name=stage if attempt == 1 else f"{stage} (attempt {attempt})",
                    tags={TAG_STAGE: stage, TAG_PARENT: parent_run_id, TAG_ATTEMPT: str(attempt),
                          TAG_CACHE_KEY: key, TAG_CODE: code, TAG_LAUNCHER: launcher})


def close_run(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    """End `run_id` with `status` (FAILED or KILLED) and `reason`, unless it finished.

    The flow's verdict wins: only it knows that the SIGTERM a stage saw was a timeout (FAILED) and
    not a user's Ctrl-C (KILLED). What the stage recorded itself is kept after the flow's reason.
    Never raises: it runs while handling a failure. A run it cannot close (the tracking server does not
    answer) is remembered for the journal (`settle`); it does not wait for the server: when the server
    went down, a stage or the flow has already waited `flow.tracking_retry_seconds` for it.
    """
    if tracking_server_down(client.tracking_uri):
        LEDGER.unclosed[run_id] = (status, reason)
        log.warning("could not close MLflow run %s as %s: the tracking server %s does not answer", run_id, status,
                    client.tracking_uri)
        return
    try:
        run = client.get_run(run_id)
        if run.info.status == "FINISHED":
            LEDGER.ended[run_id] = "FINISHED"
            return
        if run.info.status != status:
            client.set_terminated(run_id, status)
        own = run.data.tags.get(TAG_FAILURE)
        client.set_tag(run_id, TAG_FAILURE, (reason if not own or own == reason else
                                             f"{reason}; the stage recorded: {own}")[:4000])
        LEDGER.ended[run_id] = status
        LEDGER.unclosed.pop(run_id, None)
    except Exception as err:
        LEDGER.unclosed[run_id] = (status, reason)
        log.warning("could not close MLflow run %s as %s: %s", run_id, status, err)


def settle(tracking_uri: str, stopped: bool) -> list[str]:
    """Journal the runs this process could not close; return lines that say truthfully which runs it
    closed and which it could not.

    Args:
        stopped: the flow was interrupted (or abandoned while stuck): a run it opened that it neither saw
            end nor tried to close may still be RUNNING, and is journaled too (to end KILLED).
    """
    ledger = LEDGER
    if stopped:
        left = [r for r in ledger.opened if r not in ledger.ended and r not in ledger.unclosed]
        client = MlflowClient(tracking_uri) if left else None
        for run_id in left:  # closed now if the server answers, else journaled (close_run)
            close_run(client, run_id, "KILLED", "ufo was stopped before its flow closed the run")
    lines = []
    closed = [f"{ledger.opened.get(r, 'run')} {r} {s}" for r, s in ledger.ended.items() if s != "FINISHED"]
    if closed:
        lines.append("closed: " + ", ".join(closed))
    if ledger.unclosed:
        path = unclosed_runs_journal()
        with file_lock(path.with_suffix(".lock")):
            journal = json.loads(path.read_text()) if path.is_file() else {}
            entries = journal.setdefault(tracking_uri, [])
            known = {e["run_id"] for e in entries}
            entries += [{"run_id": r, "status": s, "reason": why, "what": ledger.opened.get(r, "run"),
                         "time": time.time()} for r, (s, why) in ledger.unclosed.items() if r not in known]
            path.write_text(json.dumps(journal, indent=2))
        lines.append("could not close (the tracking server did not answer): "
                     + ", ".join(f"{ledger.opened.get(r, 'run')} {r} (to end {s})" for r, (s, _) in ledger.unclosed.items())
                     + f"; they stay RUNNING until the next `ufo` command or `ufo stack` reaches {tracking_uri} "
                       f"and closes them (journal: {path})")
    return lines


def close_journaled(client: MlflowClient) -> list[str]:
    """Close the runs that an earlier `ufo` could not close against this tracking store (`settle`), if they
    are still RUNNING, with the reason in `ufo.failure`; return what was closed. Does nothing while the
    server does not answer."""
    path = unclosed_runs_journal()
    if not path.is_file() or tracking_server_down(client.tracking_uri):
        return []
    done = []
    with file_lock(path.with_suffix(".lock")):
        journal = json.loads(path.read_text())
        left = []
        for entry in journal.get(client.tracking_uri, []):
            try:
                run = client.get_run(entry["run_id"])
                if run.info.status == "RUNNING":
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
                    client.set_tag(entry["run_id"], TAG_FAILURE, (
                        f"{entry['reason']} (closed later: the tracking server did not answer when the run ended "
                        f"at {when})")[:4000])
                    client.set_terminated(entry["run_id"], entry["status"])
                    done.append(f"{entry['what']} {entry['run_id']} {entry['status']}")
            except Exception as err:
                if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                    continue  # deleted since: nothing to close
                log.warning("could not close journaled run %s: %s", entry["run_id"], err)
                left.append(entry)  # the server went away again, say: the next time
        if left:
            journal[client.tracking_uri] = left
        else:
            journal.pop(client.tracking_uri, None)
        path.write_text(json.dumps(journal, indent=2))
    return done


def read_stage_output(client: MlflowClient, stage: str, run_id: str) -> StageOutput:
    """The Output a FINISHED stage run logged; an error naming the run if it is missing."""
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        raise RuntimeError(f"stage {stage} exited 0 but its MLflow run {run_id} is {status}")
    LEDGER.ended.setdefault(run_id, "FINISHED")
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
