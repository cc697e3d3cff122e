"""A server of the team stack fails while a pipeline runs (`make test-containers`; no Docker needed).

One real stack (`ufo stack up` with a process work pool: PostgreSQL, MLflow with its auth app, Prefect
with its auth string, a worker) in a temporary workspace; the micro pipeline runs against it while the
test restarts PostgreSQL, kills the MLflow server, or kills the worker. Each test reads the runs'
states back from MLflow and Prefect afterwards, not only the exit code, and holds the time it took to
its stated bound.
"""

from __future__ import annotations

import json
import os
import signal
import time

import mlflow
import pytest

from stages.common.contracts import OUTPUT_TYPES
from stages.common.processes import free_port, group_members
from stages.common.tracking import fetch_verified
from tests.helpers import MICRO, Stack, prefect_client, start_ufo, wait_for_text

pytestmark = pytest.mark.stack
POOL = "ufo-faults"
EXPERIMENT = "ufo-micro"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("faults-stack"))
    s.env["PREFECT_WORKER_HEARTBEAT_SECONDS"] = "5"  # a dead worker is noticed in 10 s, not a minute
    mp = pytest.MonkeyPatch()
    try:
        up = s.ufo("stack", "up", "--pool", POOL, "--pool-type", "process", "--mlflow-port", str(free_port()),
                   "--prefect-port", str(free_port()), "--postgres-port", str(free_port()), timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        for key, value in s.load_env().items():  # this process's MLflow calls log in as `source env.sh` would
            mp.setenv(key, value)
        mlflow.set_tracking_uri(s.env["MLFLOW_TRACKING_URI"])
        deploy = s.ufo("deploy", MICRO, "--pool", POOL, timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        yield s
    finally:
        mp.undo()
        down = s.ufo("stack", "down", timeout=300)
        print(down.stdout, down.stderr)


def _pid(stack: Stack, server: str) -> int:
    return json.loads((stack.home / "stack" / "stack.json").read_text())["processes"][server]


def _runs_of(pipeline_id: str) -> dict[str, mlflow.entities.Run]:
    """The pipeline run and its stage runs, by stage name ("pipeline" for the parent)."""
    client = mlflow.MlflowClient()
    parent = client.get_run(pipeline_id)
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{pipeline_id}'")
    return {"pipeline": parent, **{c.data.tags["ufo.stage"]: c for c in children}}


def _newest_pipeline(since_ms: int) -> str:
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string=f"tags.`ufo.kind` = 'pipeline' and attributes.start_time > {since_ms}",
                              order_by=["attributes.start_time DESC"])
    assert runs, "no pipeline run"
    return runs[0].info.run_id


def _running(since_ms: int) -> list[str]:
    return [r.info.run_id for r in mlflow.search_runs(
        experiment_names=[EXPERIMENT], output_format="list",
        filter_string=f"attributes.status = 'RUNNING' and attributes.start_time > {since_ms}")]


def _verify_finished(runs: dict, tmp_path) -> None:
    """Every FINISHED stage run's artifacts still verify by digest, through the server."""
    for stage, run in runs.items():
        if stage == "pipeline" or run.info.status != "FINISHED":
            continue
        out = OUTPUT_TYPES[stage].model_validate(mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/ufo/output.json"))
        for name, ref in out.artifacts.items():
            fetch_verified(ref, tmp_path / stage / name)


def _flow_run_state(stack: Stack, flow_run_id: str) -> str:
    with prefect_client(stack.env) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def _wait_stage_running(stage: str, since_ms: int, proc, log, timeout: float = 300) -> str:
    """The run id of `stage`'s RUNNING MLflow run once it has logged a metric (it is mid-stage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                  filter_string=f"tags.`ufo.stage` = '{stage}' and attributes.status = 'RUNNING' "
                                                f"and attributes.start_time > {since_ms}")
        if runs and runs[0].data.metrics:
            return runs[0].info.run_id
        time.sleep(0.5)
    pytest.fail(f"{stage} did not start logging within {timeout} s:\n{log.read_text()[-4000:]}")


def _kill_and_wait(pids: list[int], proc, log, what: str) -> tuple[float, str]:
    """SIGKILL `pids`; wait for `ufo` to fail (exit 1); return the seconds it took and its log."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = proc.wait(timeout=600)
    took, out = time.monotonic() - killed, log.read_text()
    print(f"{what}: ufo exited {code} {took:.1f} s later")
    assert code == 1, out[-4000:]
    return took, out


def test_postgres_restarted_mid_rl_the_pipeline_finishes(stack, tmp_path):
    """Today's good behaviour, pinned: the servers reconnect, the pipeline finishes, nothing stays open."""
    since, log = int(time.time() * 1000), tmp_path / "ufo.log"
    proc = start_ufo(stack.home, "run", MICRO, "--force", "--set", "rl.steps=30", log=log, **stack.env)
    rl = _wait_stage_running("rl", since, proc, log)
    restart = stack.ufo("stack", "restart", "postgres", timeout=120)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert mlflow.MlflowClient().get_run(rl).info.status == "RUNNING"  # the restart fell inside the stage
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    runs = _runs_of(_newest_pipeline(since))
    assert {s: r.info.status for s, r in runs.items()} == dict.fromkeys(
        ("pipeline", "curate", "sft", "rl", "evaluate"), "FINISHED")
    assert _flow_run_state(stack, runs["pipeline"].data.tags["prefect.flow_run_id"]) == "COMPLETED"
    _verify_finished(runs, tmp_path)
    assert not _running(since)


def test_mlflow_killed_mid_stage_fails_in_bounded_time_and_its_runs_are_closed_once_it_is_back(stack, tmp_path):
    bound = 20.0  # flow.tracking_retry_seconds
    since, log = int(time.time() * 1000), tmp_path / "ufo.log"
    proc = start_ufo(stack.home, "run", MICRO, "--force", "--set", "rl.steps=200",
                     "--set", f"flow.tracking_retry_seconds={bound:g}", log=log, **stack.env)
    rl = _wait_stage_running("rl", since, proc, log)
    pipeline = _newest_pipeline(since)
    leader = _pid(stack, "mlflow")
    took, out = _kill_and_wait([leader, *group_members(leader)], proc, log,  # the server and its workers
                               f"MLflow killed mid-rl (tracking_retry_seconds {bound:g})")
    # The stage gave up within the bound (plus the flow's own calls, each bounded the same way), naming the server.
    assert took < 4 * bound + 30, out[-4000:]
    assert stack.env["MLFLOW_TRACKING_URI"] in out, out[-4000:]
    # Truthful: the runs it could not close are named as such, and nothing claims they were closed.
    assert "could not close" in out and rl in out and pipeline in out, out[-4000:]
    assert "closed as KILLED" not in out

    restart = stack.ufo("stack", "restart", "mlflow", timeout=180)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    runs = _runs_of(pipeline)
    assert not _running(since), {s: r.info.status for s, r in runs.items()}  # closed by `ufo stack` itself
    assert runs["rl"].info.status == "FAILED" and runs["pipeline"].info.status == "FAILED"
    assert "closed later" in runs["rl"].data.tags["ufo.failure"], runs["rl"].data.tags["ufo.failure"]
    assert runs["curate"].info.status == runs["sft"].info.status == "FINISHED"
    _verify_finished(runs, tmp_path)
    assert _flow_run_state(stack, runs["pipeline"].data.tags["prefect.flow_run_id"]) == "FAILED"


def test_worker_killed_the_stage_fails_naming_the_pool_and_a_rerun_completes(stack, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    claim = 15.0  # flow.deployment_claim_seconds
    since, log = int(time.time() * 1000), tmp_path / "ufo.log"
    sets = ("--set", "flow.launcher=deployment", "--set", f"flow.deployment_claim_seconds={claim:g}")
    proc = start_ufo(stack.home, "run", MICRO, "--force", *sets, log=log, **stack.env)
    wait_for_text(log, "curate: flow run", proc, timeout=300)
    worker = _pid(stack, f"worker-{POOL}")
    # The worker only, as a crash would: a flow run it started may finish.
    took, out = _kill_and_wait([worker], proc, log, f"worker killed (deployment_claim_seconds {claim:g})")
    assert f"work pool {POOL}" in out and "Marked it Crashed" in out, out[-4000:]
    # At most one stage (started before the kill) runs out, then the next one waits the bound.
    assert took < claim + 120, out[-4000:]
    pipeline = _newest_pipeline(since)
    runs = _runs_of(pipeline)
    failed = [s for s, r in runs.items() if s != "pipeline" and r.info.status == "FAILED"]
    assert len(failed) == 1 and "Marked it Crashed" in runs[failed[0]].data.tags["ufo.failure"]
    assert not _running(since)
    parent_flow = runs["pipeline"].data.tags["prefect.flow_run_id"]
    with prefect_client(stack.env) as client:
        assert client.read_flow_run(parent_flow).state.type.value == "FAILED"
        stage_flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow])))
        states = sorted(f.state.type.value for f in stage_flows)
        assert "CRASHED" in states and not {"RUNNING", "SCHEDULED", "PENDING"} & set(states), states

    up = stack.ufo("stack", "restart", "worker", timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    rerun = stack.ufo("run", MICRO, *sets, "--from-run", pipeline, "--only", failed[0], timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    again = _runs_of(_newest_pipeline(since))
    assert all(r.info.status == "FINISHED" for r in again.values()), {s: r.info.status for s, r in again.items()}
    assert not _running(since)
