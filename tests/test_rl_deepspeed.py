"""RL on DeepSpeed ZeRO-2 over 2 CPU processes (gloo), launched by the RL stage itself: with a tiny budget,
every step's losses, gradient norms and rollout metrics equal the single-process run's (the episodes are
rank 0's, so they are the same samples; the only difference is the order of float sums), and so do the
final weights. configs/tiny-zero2.yaml's rl section, with the budget cut down.

Slow (two stage runs, one of them starting 2 DeepSpeed ranks): `pytest -m slow tests/test_rl_deepspeed.py`.
"""

from __future__ import annotations

import json

import mlflow
import pytest
from safetensors.torch import load_file

from flows.config import PipelineConfig
from stages import rl
from stages.common.config import load_config
from stages.common.contracts import ArtifactRef
from stages.common.tracking import fetch_verified
from stages.rl.checkpoint import TAG_CHECKPOINT
from tests.helpers import REPO, metric_histories

pytest.importorskip("deepspeed")

STEPS = 2
LR = 1e-3


def _rl_section(upstream, **update) -> rl.Config:
    data, sft = upstream
    cfg = load_config(PipelineConfig, REPO / "configs" / "tiny-zero2.yaml").rl
    # 2 minibatches of 8 per step, each cut into several micro-batches (an odd count: one rank runs a
    # weight-0 repeat), PPO with a separate critic and a KL reference: every model and both engines. The
    # shared-prefix forward is torch-only, so it is off in both runs: the same sums in the same order.
    short = {"experiment": "rl-ds", "data": data.model_dump(mode="json"), "sft": sft.model_dump(mode="json"),
             "steps": STEPS, "problems_per_step": 4, "group_size": 4, "minibatch_size": 8, "max_turns": 2,
             "max_new_tokens": 6, "max_prompt_tokens": 12, "max_feedback_tokens": 4, "micro_batch_tokens": 60,
             "micro_batch_call_cost": 0, "lr": LR, "critic_lr": LR, "checkpoint_every": 1,
             "shared_prefix": False}
    return rl.Config.model_validate({**cfg.model_dump(mode="json"), **short, **update})


@pytest.mark.slow
def test_zero2_two_ranks_match_the_single_process_rl_run(upstream, tmp_path, monkeypatch):
    # One thread per process in both runs: the rollout's sampled tokens depend on the logits' last bits.
    monkeypatch.setenv("UFO_THREADS", "1")
    zero2 = _rl_section(upstream)
    assert (zero2.engine.kind, zero2.engine.num_processes, zero2.engine.deepspeed.zero_stage) == ("deepspeed", 2, 2)
    assert (zero2.algorithm, zero2.critic) == ("ppo", "separate") and zero2.kl_coef > 0
    single = rl.run(_rl_section(upstream, engine={"kind": "torch"}))
    ranks = rl.run(zero2)

    one, two = (metric_histories(out.run_id, skip=("perf/", "rl/")) for out in (single, ranks))
    assert one.keys() == two.keys() and {"loss/policy", "loss/value", "loss/grad_norm", "loss/critic_grad_norm",
                                         "loss/kl", "rollout/reward_mean"} <= one.keys()
    for key in sorted(one):
        # logged once per step, by rank 0 only
        assert [s for s, _ in one[key]] == [s for s, _ in two[key]] == list(range(1, STEPS + 1)), key
        assert [v for _, v in two[key]] == pytest.approx([v for _, v in one[key]], rel=1e-4, abs=1e-6), key
    for key in ("loss/policy", "loss/value", "loss/grad_norm"):
        print(f"{key}: 1 process {one[key]}, 2 ranks {two[key]}")

    a = load_file(fetch_verified(single.artifact("model"), tmp_path / "a") / "model.safetensors")
    b = load_file(fetch_verified(ranks.artifact("model"), tmp_path / "b") / "model.safetensors")
    base = load_file(fetch_verified(upstream[1].artifact("model"), tmp_path / "c") / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not a[k].equal(base[k]) for k in a)  # the policy was trained
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"final policy weights: max abs diff 1 process vs 2 ranks {worst:.2e} (lr {LR})")
    assert worst < 1e-5
    run = mlflow.MlflowClient().get_run(ranks.run_id)
    assert run.info.status == "FINISHED"
    # the step-1 checkpoint: DeepSpeed's own (each rank's optimizer partition), uploaded once by rank 0
    saved = json.loads(run.data.tags[TAG_CHECKPOINT])
    assert saved["step"] == 1
    files = {p.name for p in (fetch_verified(ArtifactRef(uri=saved["uri"], sha256=saved["sha256"]),
                                             tmp_path / "ckpt")).rglob("*")}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "torch_rng.pt", "state.json"} <= files, sorted(files)
