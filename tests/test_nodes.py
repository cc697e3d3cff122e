"""A training stage on several nodes, without Docker (stages/common/rank.py): the rank launchers' command
lines for node k, read back by torchrun's and DeepSpeed's own parsers; what a node needs from its
environment; and, slow, the whole protocol on one host: two stage processes as nodes 0 and 1 (node 1
follows node 0's job from the MLflow run and fetches its own inputs), whose RL run matches the
one-process run. The same stage on two containers of a Docker network: tests/test_containers.py; what the
deployment launcher hands a Kubernetes pool for it (job variables, the pods' command): here, and the Indexed
Job rendered from them: tests/test_resources.py.
"""

from __future__ import annotations

import json

import mlflow
import pytest
import torch.distributed.run as torchrun
from safetensors.torch import load_file

from flows.config import PipelineConfig
from flows.launchers import StageJob, deployment_job_variables
from flows.node import node_command
from flows.resources import Resources
from stages import rl
from stages.common.config import ConfigError, load_config
from stages.common.contracts import ArtifactRef
from stages.common.model_spec import EngineConfig
from stages.common.processes import Group, free_port, node_env, spawn, stage_command, stage_env, watch
from stages.common.rank import JOB_ARTIFACT, Node, launch_command
from stages.common.tracking import fetch_verified
from tests.helpers import REPO, metric_histories

SPEC = EngineConfig(kind="deepspeed", num_processes=4, nodes=2)


def test_torchrun_on_node_1_joins_node_0s_static_rendezvous(tmp_path):
    cmd = launch_command(SPEC, "stages.common.rank", ["t:f", "job.json"], Node(2, 1, "ufo-rl-x-node0", 29511),
                         tmp_path)
    args = torchrun.parse_args(cmd[cmd.index("torch.distributed.run") + 1:])
    # static: global rank = node_rank * nproc_per_node + local rank, so rank 0 is on node 0 (c10d would
    # ignore --node_rank and order the nodes by host name)
    assert (args.rdzv_backend, args.nnodes, args.node_rank, args.nproc_per_node) == ("static", "2", 1, "4")
    assert (args.master_addr, args.master_port) == ("ufo-rl-x-node0", 29511)
    assert args.module and (args.training_script, args.training_script_args) == ("stages.common.rank",
                                                                                 ["t:f", "job.json"])


def test_the_deepspeed_launcher_on_node_1_runs_without_ssh_its_ranks_4_to_7(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    spec = SPEC.model_copy(update={"launcher": "deepspeed"})
    cmd = launch_command(spec, "stages.common.rank", ["t:f", "job.json"], Node(2, 1, "ufo-rl-x-node0", 29511),
                         tmp_path)
    args = parse_args(cmd[cmd.index("deepspeed.launcher.runner") + 1:])
    assert args.no_ssh and args.node_rank == 1 and args.master_addr == "ufo-rl-x-node0" and args.master_port == 29511
    hosts = fetch_hostfile(args.hostfile)  # what the launcher derives the global ranks from (slots in order)
    assert list(hosts.values()) == [4, 4] and args.num_gpus == 4
    assert args.module and args.user_script == "stages.common.rank" and args.user_args == ["t:f", "job.json"]


def test_a_node_takes_its_place_from_the_environment(monkeypatch):
    assert Node.of(EngineConfig()).count == 1  # one node: this machine, nothing to read
    for key in ("UFO_NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="engine.nodes is 2 but UFO_NODE_RANK and MASTER_ADDR are not set"):
        Node.of(SPEC)
    for key, value in node_env(1, "ufo-rl-x-node0").items():
        monkeypatch.setenv(key, value)
    assert Node.of(SPEC) == Node(2, 1, "ufo-rl-x-node0", 29500)
    monkeypatch.setenv("UFO_NODE_RANK", "2")
    with pytest.raises(RuntimeError, match="UFO_NODE_RANK=2 is not a node of engine.nodes = 2"):
        Node.of(SPEC)


def _rl_config(upstream, **update) -> rl.Config:
    """tests/test_rl_deepspeed.py's cut-down tiny-zero2 RL section."""
    data, sft = upstream
    cfg = load_config(PipelineConfig, REPO / "configs" / "tiny-zero2.yaml").rl
    short = {"experiment": "rl-nodes", "data": data.model_dump(mode="json"), "sft": sft.model_dump(mode="json"),
             "steps": 2, "problems_per_step": 4, "group_size": 4, "minibatch_size": 8, "max_turns": 2,
             "max_new_tokens": 6, "max_prompt_tokens": 12, "max_feedback_tokens": 4, "micro_batch_tokens": 60,
             "micro_batch_call_cost": 0, "lr": 1e-3, "critic_lr": 1e-3, "checkpoint_every": 1,
             "shared_prefix": False}
    return rl.Config.model_validate({**cfg.model_dump(mode="json"), **short, **update})


@pytest.mark.slow  # ~2 min on 2 busy cores: pytest -m slow tests/test_nodes.py
def test_rl_on_two_nodes_here_matches_the_single_process_run(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("UFO_THREADS", "1")  # the rollout's sampled tokens depend on the logits' last bits
    single = rl.run(_rl_config(upstream, engine={"kind": "torch"}))
    config = _rl_config(upstream, engine={"kind": "deepspeed", "num_processes": 1, "nodes": 2})
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("rl-nodes").experiment_id).info.run_id
    cmd = stage_command("rl", config=config.model_dump(mode="json"), run_id=run_id, parent_run_id=run_id)
    port = free_port()
    nodes = Group({f"node {k}": spawn(cmd, env=stage_env() | node_env(k, "127.0.0.1", port), cwd=REPO)
                   for k in range(2)})
    lines: list[str] = []
    outcome = watch(nodes, lines.append, timeout_seconds=1200, grace_seconds=5)
    assert outcome.returncode == 0, "\n".join(lines[-60:])
    assert any(line.startswith("[node 1] ") and "waiting for node 0's job" in line for line in lines)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    one, two = (metric_histories(r, skip=("perf/", "rl/")) for r in (single.run_id, run_id))
    assert one.keys() == two.keys() and {"loss/policy", "loss/value", "loss/grad_norm"} <= one.keys()
    for key in sorted(one):  # logged once per step, by rank 0 only (node 1 never writes to the run)
        assert [s for s, _ in two[key]] == [s for s, _ in one[key]] == [1, 2], key
        assert [v for _, v in two[key]] == pytest.approx([v for _, v in one[key]], rel=1e-4, abs=1e-6), key
    output = rl.Output.model_validate(mlflow.artifacts.load_dict(f"runs:/{run_id}/ufo/output.json"))
    a = load_file(fetch_verified(single.artifact("model"), tmp_path / "a") / "model.safetensors")
    b = load_file(fetch_verified(output.artifact("model"), tmp_path / "b") / "model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"final policy weights: max abs diff 1 process vs 2 nodes {worst:.2e}")
    assert worst < 1e-5
    job = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{JOB_ARTIFACT}"))
    assert set(job["inputs"]) == {"problems", "model_dir"}  # what node 1 fetched for itself
    # the step-1 checkpoint holds node 1's optimizer partitions too, moved to rank 0 before the upload
    saved = json.loads(run.data.tags["ufo.rl.checkpoint"])
    ckpt = fetch_verified(ArtifactRef(uri=saved["uri"], sha256=saved["sha256"]), tmp_path / "ckpt")
    files = {p.name for p in ckpt.rglob("*")}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files


def test_deployment_job_variables_carry_the_nodes_to_a_kubernetes_pool(tmp_path):
    resources = Resources(gpus=8, nodes=2)
    job = StageJob(stage="rl", config={"seed": 1}, run_id="run1", parent_run_id="parent1", workdir=tmp_path,
                   resources=resources)
    variables = deployment_job_variables(job, "kubernetes", "ufo-k8s", "http://mlflow:5000", {"HF_TOKEN_PATH": "/s"})
    assert variables["nodes"] == 2 and variables["resource_limits"] == {"nvidia.com/gpu": "8"}
    env = variables["env"]
    assert env["HF_TOKEN_PATH"] == "/s" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"  # deployment's kept
    assert env["MASTER_PORT"] == "29500" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    # The rank and MASTER_ADDR differ per pod: the template sets them, not the launcher.
    assert "UFO_NODE_RANK" not in env and "MASTER_ADDR" not in env
    assert env["UFO_STAGE"] == "rl" and json.loads(env["UFO_STAGE_ARGS"]) == job.args()

    one = deployment_job_variables(StageJob("rl", {}, "r", "p", tmp_path, resources=Resources(gpus=8)),
                                   "kubernetes", "ufo-k8s", "http://mlflow:5000")
    assert "nodes" not in one and "UFO_STAGE" not in one["env"] and "MASTER_PORT" not in one["env"]


@pytest.mark.parametrize("pool_type", ["docker", "process"])
def test_deployment_launcher_refuses_several_nodes_on_a_pool_of_one_process_per_run(tmp_path, pool_type):
    job = StageJob("sft", {}, "r", "p", tmp_path, resources=Resources(nodes=2))
    with pytest.raises(ConfigError, match=rf"flow\.sft\.resources\.nodes: 2 nodes need a Kubernetes work pool.*"
                                          rf"ufo-pool is a {pool_type} pool"):
        deployment_job_variables(job, pool_type, "ufo-pool", "http://mlflow:5000")


def test_a_pod_other_than_node_0_runs_the_stage_it_is_given():
    env = {"UFO_NODE_RANK": "1", "UFO_STAGE": "sft", "UFO_STAGE_ARGS": json.dumps(["--run-id", "r"])}
    assert node_command(["prefect", "flow-run", "execute"], env)[1:] == ["-m", "stages.sft", "--run-id", "r"]
    assert node_command(["prefect", "flow-run", "execute"], {"UFO_NODE_RANK": "0"}) == ["prefect", "flow-run", "execute"]
    with pytest.raises(SystemExit, match="node 1, but UFO_STAGE and UFO_STAGE_ARGS are not set"):
        node_command(["prefect", "flow-run", "execute"], {"UFO_NODE_RANK": "1"})
