"""Kill the RL stage with SIGKILL after a checkpoint, run it again: it resumes from that checkpoint and
ends exactly where an uninterrupted run with the same seed ends (same weights, same metrics, bit for bit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
from safetensors.torch import load_file

from stages import rl
from stages.common.tracking import fetch_verified, tracking_uri
from stages.rl.checkpoint import TAG_CHECKPOINT, TAG_RESUMED_FROM
from tests.helpers import REPO, metric_histories

STEPS = 8


def _config(upstream, experiment: str) -> rl.Config:
    data, model = upstream
    return rl.Config(experiment=experiment, data=data, sft=model, steps=STEPS, problems_per_step=4, group_size=4,
                     minibatch_size=16, max_turns=2, max_new_tokens=6, max_prompt_tokens=12, max_feedback_tokens=4, lr=1e-2, critic_lr=1e-2, checkpoint_every=2,
                     algorithm="ppo", critic="separate", kl_coef=0.05)


def test_killed_rl_stage_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(upstream, tmp_path,
                                                                                     monkeypatch):
    # One thread in every run (this process and the stage process): bitwise equality needs the same
    # reduction order everywhere, and one thread cannot spin-wait on a busy machine.
    monkeypatch.setenv("UFO_THREADS", "1")
    reference = rl.run(_config(upstream, "resume-ref"))

    # The same config in another experiment, as a stage process killed once it has a checkpoint.
    cfg = _config(upstream, "resume")
    cfg_path = tmp_path / "rl.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    proc = subprocess.Popen([sys.executable, "-m", "stages.rl", "--config", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_run = None
    deadline = time.time() + 240
    while killed_run is None and time.time() < deadline and proc.poll() is None:
        exp = mlflow.get_experiment_by_name("resume")
        runs = mlflow.MlflowClient().search_runs([exp.experiment_id]) if exp else []
        killed_run = next((r for r in runs if TAG_CHECKPOINT in r.data.tags), None)
        time.sleep(0.05)
    assert proc.poll() is None, f"the stage ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_run is not None, "no checkpoint within 240 s"
    killed = mlflow.MlflowClient().get_run(killed_run.info.run_id)
    assert killed.info.status == "RUNNING"  # SIGKILL: nothing closed the run
    saved_step = json.loads(killed.data.tags[TAG_CHECKPOINT])["step"]
    assert 2 <= saved_step < STEPS

    # Run it again (a new MLflow run, as a flow retry would be): it resumes from the newest checkpoint.
    resumed = rl.run(cfg)
    run = mlflow.MlflowClient().get_run(resumed.run_id)
    assert run.data.tags[TAG_RESUMED_FROM] == f"{killed.info.run_id}@step-{saved_step}"
    assert resumed.metrics["rl/resumed_at_step"] == saved_step
    assert resumed.metrics["rl/train_reward_last10"] == reference.metrics["rl/train_reward_last10"]

    # Same final weights and the same metric at every step, exactly (tolerance 0).
    ref_w = load_file(fetch_verified(reference.artifact("model"), tmp_path / "a") / "model.safetensors")
    new_w = load_file(fetch_verified(resumed.artifact("model"), tmp_path / "b") / "model.safetensors")
    assert ref_w.keys() == new_w.keys()
    assert all(ref_w[k].equal(new_w[k]) for k in ref_w)
    ref_h, new_h = (metric_histories(out.run_id, skip=("perf/", "rl/")) for out in (reference, resumed))
    assert "loss/value" in ref_h and "rollout/reward_mean" in ref_h
    assert ref_h.keys() == new_h.keys()
    for key in ref_h:
        assert [s for s, _ in new_h[key]] == list(range(1, STEPS + 1)), key  # the whole curve, re-logged
        assert new_h[key] == ref_h[key], key
