"""The whole pipeline through the real `ufo run` command: Prefect's embedded server, four stage
processes, a local SQLite MLflow store. Then MLflow is queried the way a user would."""

from __future__ import annotations

import math

import mlflow
import pytest

from stages.common.contracts import OUTPUT_TYPES
from stages.common.tracking import fetch_verified
from tests.helpers import find_runs, metric_histories, ufo_run, use_workspace, workspace_tracking_uri

T = 5
METRICS = [f"succ_at_{k}" for k in range(1, T + 1)] + [f"pass_at_{k}" for k in range(1, T + 1)] + \
    ["effective_answer_ratio", "avg_turns", "invalid_rate"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """`ufo run configs/smoke.yaml` in an empty workspace, as on a fresh clone: the run creates its MLflow
    store (no MLFLOW_TRACKING_URI: the default, a SQLite store inside the workspace) and its Prefect
    database. The tests after it rerun in the same workspace (`pipeline.workspace`)."""
    workspace = tmp_path_factory.mktemp("ufo")
    with pytest.MonkeyPatch.context() as mp:
        use_workspace(mp, workspace)
        proc = ufo_run(workspace, "configs/smoke.yaml")
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        mlflow.set_tracking_uri(workspace_tracking_uri(workspace))
        proc.parents = find_runs("tags.`ufo.kind` = 'pipeline'")  # as they were right after the run
        proc.workspace = workspace
        yield proc


def test_one_pipeline_run_with_four_finished_stage_runs(pipeline, tmp_path):
    parents = pipeline.parents
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    children = find_runs(f"tags.`mlflow.parentRunId` = '{pid}'")
    assert sorted(c.data.tags["ufo.stage"] for c in children) == ["curate", "evaluate", "rl", "sft"]
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        stage = child.data.tags["ufo.stage"]
        assert mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/config/resolved.yaml")
        out = OUTPUT_TYPES[stage].model_validate(mlflow.artifacts.load_dict(f"runs:/{pid}/outputs/{stage}.json"))
        assert out.run_id == child.info.run_id
        for name, ref in out.artifacts.items():
            fetch_verified(ref, tmp_path / stage / name)  # raises on a digest mismatch
    assert "Inspect the runs" in pipeline.stdout and "mlflow ui --backend-store-uri sqlite:///" in pipeline.stdout
    assert "/#/experiments/" in pipeline.stdout and "?workflowType=machine_learning" in pipeline.stdout


def test_every_evaluate_metric_is_logged_and_consistent(pipeline):
    (ev,) = find_runs("tags.`ufo.stage` = 'evaluate'")
    m = ev.data.metrics
    for model in ("sft", "rl"):
        for name in METRICS:
            assert f"eval/{model}/{name}" in m, f"eval/{model}/{name}"
        succ = [m[f"eval/{model}/succ_at_{k}"] for k in range(1, T + 1)]
        assert succ == sorted(succ), "Succ@k never decreases in k"
        assert succ[0] > 0, "the smoke SFT model solves something"
        identity = 1 + sum(1 - s for s in succ[:-1])
        assert m[f"eval/{model}/avg_turns"] == pytest.approx(identity, abs=1e-9)
        # Succ@1 is a single-turn attempt: it agrees with Pass@1 within sampling noise (4 standard errors).
        p1, n = m[f"eval/{model}/pass_at_1"], 200
        assert abs(succ[0] - p1) <= 4 * math.sqrt(max(p1 * (1 - p1), 0.01) / n)
        pass_k = [m[f"eval/{model}/pass_at_{k}"] for k in range(1, T + 1)]
        assert pass_k == sorted(pass_k)


def test_rl_logged_per_step_training_reward(pipeline):
    (rl_run,) = find_runs("tags.`ufo.stage` = 'rl'")
    history = metric_histories(rl_run.info.run_id, keys=["rollout/reward_mean"])["rollout/reward_mean"]
    assert [step for step, _ in history] == [1, 2, 3, 4]


def test_stage_output_streams_into_prefect_logs(pipeline):
    log = pipeline.stdout + pipeline.stderr
    for stage in ("curate", "sft", "rl", "evaluate"):
        assert f"Task run '{stage}'" in log and f"[{stage}] {stage}: done, MLflow run" in log


def test_rerun_from_an_earlier_run_reuses_upstream_stages(pipeline):
    mlflow.set_tracking_uri(workspace_tracking_uri(pipeline.workspace))
    (parent,) = pipeline.parents
    proc = ufo_run(pipeline.workspace, "configs/smoke.yaml", "--from-run", parent.info.run_id, "--only", "evaluate",
                   "--set", "evaluate.max_problems=20")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (rerun,) = [r for r in find_runs("tags.`ufo.kind` = 'pipeline'") if r.info.run_id != parent.info.run_id]
    old = {c.data.tags["ufo.stage"]: c.info.run_id for c in find_runs(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert {s: rerun.data.tags[f"ufo.reused.{s}"] for s in ("curate", "sft", "rl")} == \
        {s: old[s] for s in ("curate", "sft", "rl")}
    (new_eval,) = find_runs(f"tags.`mlflow.parentRunId` = '{rerun.info.run_id}'")
    assert new_eval.data.tags["ufo.stage"] == "evaluate" and new_eval.info.status == "FINISHED"
    assert new_eval.info.run_id != old["evaluate"]


def test_a_failing_stage_fails_the_pipeline_clearly_after_its_retries(ufo_workspace):
    proc = ufo_run(ufo_workspace, "configs/smoke.yaml", "--set", "curate.sources=[{kind: gsm8k, path: /nonexistent}]",
                   "--set", "flow.curate.retries=1", "--set", "flow.retry_delay_seconds=0")
    assert proc.returncode == 1
    assert "error: pipeline failed: stage curate exited with code 2" in proc.stderr
    assert "sources.0.path: /nonexistent: no such file" in proc.stderr  # the stage's own message, from its log tail
    log = proc.stdout + proc.stderr
    assert log.count("-m stages.curate --config") == 2  # the first attempt and one retry
    mlflow.set_tracking_uri(workspace_tracking_uri(ufo_workspace))
    (parent,) = find_runs("tags.`ufo.kind` = 'pipeline'")
    assert parent.info.status == "FAILED"
    assert not find_runs("tags.`ufo.stage` = 'sft'")  # nothing downstream ran


def _stage_runs(parent_run_id: str) -> dict[str, object]:
    return {c.data.tags["ufo.stage"]: c for c in find_runs(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")}


def _new_pipeline(before: set[str]):
    (run,) = [r for r in find_runs("tags.`ufo.kind` = 'pipeline'") if r.info.run_id not in before]
    return run


def test_an_identical_rerun_takes_every_stage_from_the_cache(pipeline):
    mlflow.set_tracking_uri(workspace_tracking_uri(pipeline.workspace))  # another test may have moved it
    (first,) = pipeline.parents
    before = {r.info.run_id for r in find_runs("tags.`ufo.kind` = 'pipeline'")}
    proc = ufo_run(pipeline.workspace, "configs/smoke.yaml")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    again = _new_pipeline(before)
    assert again.info.status == "FINISHED"
    old, new = _stage_runs(first.info.run_id), _stage_runs(again.info.run_id)
    assert sorted(new) == ["curate", "evaluate", "rl", "sft"]
    for stage, run in new.items():  # a FINISHED record per stage, pointing at the run that computed it
        assert run.info.status == "FINISHED" and run.data.tags["ufo.cache.hit"] == "true", stage
        assert run.data.tags["ufo.cache.source_run"] == old[stage].info.run_id
    out = OUTPUT_TYPES["evaluate"].model_validate(mlflow.artifacts.load_dict(
        f"runs:/{again.info.run_id}/outputs/evaluate.json"))
    assert out.run_id == old["evaluate"].info.run_id  # the very same result, not recomputed
    assert (proc.stdout + proc.stderr).count("cache hit") == 4  # Prefect logs to stderr off a terminal


def test_changing_only_an_evaluate_field_reruns_only_evaluate(pipeline):
    mlflow.set_tracking_uri(workspace_tracking_uri(pipeline.workspace))
    before = {r.info.run_id for r in find_runs("tags.`ufo.kind` = 'pipeline'")}
    proc = ufo_run(pipeline.workspace, "configs/smoke.yaml", "--set", "evaluate.temperature=0.7")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = _stage_runs(_new_pipeline(before).info.run_id)
    hits = {stage for stage, r in runs.items() if r.data.tags.get("ufo.cache.hit") == "true"}
    assert hits == {"curate", "sft", "rl"}
    assert runs["evaluate"].info.status == "FINISHED" and "ufo.cache.hit" not in runs["evaluate"].data.tags
    # --force computes everything again, cache or not.
    before = {r.info.run_id for r in find_runs("tags.`ufo.kind` = 'pipeline'")}
    proc = ufo_run(pipeline.workspace, "configs/smoke.yaml", "--force", "--set", "rl.steps=2",
                   "--set", "evaluate.max_problems=20")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = _stage_runs(_new_pipeline(before).info.run_id)
    assert not any("ufo.cache.hit" in r.data.tags for r in runs.values())


def test_from_run_refuses_upstream_stages_made_under_another_config(pipeline):
    mlflow.set_tracking_uri(workspace_tracking_uri(pipeline.workspace))
    (parent,) = pipeline.parents
    proc = ufo_run(pipeline.workspace, "configs/smoke.yaml", "--from-run", parent.info.run_id, "--only", "rl",
                   "--set", "rl.feedback=Try again.", "--set", "sft.lr=0.001")
    assert proc.returncode == 2, proc.stderr
    # rl.feedback propagates to sft.feedback: the SFT model was trained on other feedback text.
    assert "its sft stage ran under a different config" in proc.stderr
    assert "sft.feedback (recorded \"Let's try again.\", now 'Try again.')" in proc.stderr
    assert "sft.lr (recorded 0.003, now 0.001)" in proc.stderr
