"""Each stage for real on a tiny budget, chained in-process through a local SQLite MLflow store:
the Output is well-formed AND something really happened (weights changed, metrics logged, digests
verify). Also the bad-input path of a tampered artifact. Curation has its own tests (test_curate.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
from safetensors.torch import load_file

from stages import evaluate, rl, sft
from stages.common.model_spec import ModelConfig
from stages.common.tracking import fetch_verified, sha256_path, tracking_uri
from tests.helpers import REPO, metric_history

SMALL_MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def sft_out(curated) -> sft.Output:
    cfg = sft.Config(experiment="stages", data=curated, model=SMALL_MODEL, max_steps=6, eval_every=3,
                     val_problems=16, batch_size=16, log_every=2)
    return sft.run(cfg)


@pytest.fixture(scope="module")
def rl_out(curated, sft_out) -> rl.Output:
    cfg = rl.Config(experiment="stages", data=curated, sft=sft_out, steps=2, problems_per_step=4, group_size=4,
                    minibatch_size=8, ppo_epochs=2, lr=1e-2)
    return rl.run(cfg)


def _weights(output, tmp_path, name="model"):
    folder = fetch_verified(output.artifact(name), tmp_path / output.run_id)
    return load_file(folder / "model.safetensors")


def test_sft_trains_and_logs_a_verifiable_model(sft_out, tmp_path):
    assert sft_out.run_id and set(sft_out.artifacts) == {"model", "mlflow_model"}
    folder = fetch_verified(sft_out.artifact("model"), tmp_path)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= {p.name for p in folder.iterdir()}
    assert sft_out.metrics["sft/steps"] == 6
    assert len(metric_history(sft_out.run_id, "val/sampled_accuracy")) == 2
    run = mlflow.MlflowClient().get_run(sft_out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ufo.stage"] == "sft"


def test_sft_from_pretrained_folder(module_workspace, curated, sft_out, tmp_path):
    """The hub-model code path (`init: pretrained`), exercised on a local save_pretrained folder."""
    local = fetch_verified(sft_out.artifact("model"), tmp_path / "base")
    cfg = sft.Config(experiment="stages", data=curated, model=ModelConfig(init="pretrained", name_or_path=str(local)),
                     max_steps=2, eval_every=2, val_problems=8, batch_size=8)
    out = sft.run(cfg)
    before, after = load_file(local / "model.safetensors"), _weights(out, tmp_path)
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before)


def test_rl_updates_the_policy_and_logs_per_step_metrics(sft_out, rl_out, tmp_path):
    before, after = _weights(sft_out, tmp_path), _weights(rl_out, tmp_path)
    assert any(not before[k].equal(after[k]) for k in before)
    for key in ("rollout/reward_mean", "rollout/succ_at_1", "rollout/avg_turns", "loss/policy", "loss/kl"):
        assert len(metric_history(rl_out.run_id, key)) == 2, key
    turns = metric_history(rl_out.run_id, "rollout/avg_turns")
    assert all(1 <= t <= 5 for t in turns)


def test_evaluate_logs_every_metric_curve_and_table(curated, sft_out, rl_out, tmp_path):
    out = evaluate.run(evaluate.Config(experiment="stages", data=curated, sft=sft_out, rl=rl_out, max_problems=16,
                                       num_samples=5))
    names = [f"succ_at_{k}" for k in range(1, 6)] + [f"pass_at_{k}" for k in range(1, 6)] + \
        ["effective_answer_ratio", "avg_turns", "invalid_rate"]
    logged = mlflow.MlflowClient().get_run(out.run_id).data.metrics
    for model in ("sft", "rl"):
        for n in names:
            assert f"eval/{model}/{n}" in logged
    for n in ("succ_at_5", "effective_answer_ratio", "repeat_share"):
        assert f"eval/rl_no_feedback/{n}" in logged and f"eval/rl_vs_sft/{n}_lo" in logged
    table = pd.read_parquet(fetch_verified(out.artifact("examples"), tmp_path))
    # 16 problems x 2 models x 2 conditions (with and without feedback at inference)
    assert len(table) == 64 and set(table.model) == {"sft", "rl"} and set(table.feedback) == {True, False}
    assert fetch_verified(out.artifact("report_html"), tmp_path / "html").read_text().startswith("<!doctype html>")
    png = fetch_verified(out.artifact("curves"), tmp_path / "png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _inputs(out.run_id) == {"test": (curated.artifact("test").sha256[:32], "evaluation")}


def _inputs(run_id: str) -> dict[str, tuple[str, str]]:
    """The run's MLflow dataset inputs: name -> (digest, context)."""
    inputs = mlflow.MlflowClient().get_run(run_id).inputs.dataset_inputs
    return {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in inputs}


def test_consuming_runs_show_their_datasets_models_and_telemetry(curated, sft_out, rl_out, tmp_path):
    """What the MLflow UI shows a practitioner: the curated splits each run read (the same digests curate
    logged), SFT and RL as logged MLflow models of their runs, and TRL-style telemetry per step."""
    digest = {s: curated.artifact(s).sha256[:32] for s in ("train", "val", "test")}
    assert _inputs(sft_out.run_id) == {"train": (digest["train"], "training"), "val": (digest["val"], "validation")}
    assert _inputs(rl_out.run_id) == {"train": (digest["train"], "training")}
    for out, name in ((sft_out, "sft"), (rl_out, "rl")):
        model_id = out.artifact("mlflow_model").uri.removeprefix("models:/")
        logged = mlflow.get_logged_model(model_id)
        assert (logged.name, logged.source_run_id) == (name, out.run_id)
        folder = fetch_verified(out.artifact("mlflow_model"), tmp_path / name)  # the digest of what was uploaded
        assert "transformers" in (folder / "MLmodel").read_text()
    for key in ("train/lr", "loss/grad_norm", "perf/tokens_per_second", "train/num_tokens"):
        assert len(metric_history(sft_out.run_id, key)) == 3, key  # steps 2, 4, 6
    tokens = metric_history(sft_out.run_id, "train/num_tokens")
    assert tokens[0] > 0 and all(a < b for a, b in zip(tokens, tokens[1:], strict=False))  # counted, growing
    for key in ("train/lr", "loss/grad_norm", "perf/tokens_per_second", "perf/generated_tokens_per_second"):
        assert len(metric_history(rl_out.run_id, key)) == 2, key
    assert metric_history(rl_out.run_id, "train/lr") == [1e-2, 1e-2]
    assert all(v > 0 for v in metric_history(rl_out.run_id, "perf/tokens_per_second"))


def test_stage_refuses_an_artifact_whose_digest_does_not_match(curated, tmp_path):
    """Tamper with the logged train split in the artifact store; the SFT process must refuse it."""
    local = mlflow.artifacts.download_artifacts(curated.artifact("train").uri, dst_path=str(tmp_path / "dl"))
    store_path = mlflow.MlflowClient().get_run(curated.run_id).info.artifact_uri.removeprefix("file://")
    stored = f"{store_path}/data/train.parquet"
    with open(stored, "rb") as f:
        original = f.read()
    try:
        df = pd.read_parquet(local)
        df.loc[0, "answer"] = "0"  # one poisoned label
        df.to_parquet(stored, index=False)
        assert sha256_path(stored) != curated.artifact("train").sha256
        cfg_path = tmp_path / "sft.json"
        cfg_path.write_text(json.dumps({"experiment": "stages", "data": curated.model_dump(mode="json"),
                                        "max_steps": 2, "eval_every": 2}))
        started_ms = int(time.time() * 1000)
        proc = subprocess.run([sys.executable, "-m", "stages.sft", "--config", str(cfg_path)], cwd=REPO,
                              capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()})
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert "does not match the recorded" in proc.stderr and "train.parquet" in proc.stderr
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ufo.stage` = 'sft'",
                                  output_format="list")
        late = [r for r in runs if r.info.start_time >= started_ms]
        assert late and all(r.info.status == "FAILED" for r in late)  # never a FINISHED run on bad bytes
    finally:
        with open(stored, "wb") as f:
            f.write(original)
