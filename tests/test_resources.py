"""Typed stage resources compiled for each engine, checked against the engines' own code and models:
the Docker SDK's arguments, a Prefect Docker work pool's job configuration (prefect-docker), and a
Kubernetes Job rendered from infra/work-pools/kubernetes.json by prefect-kubernetes, then read back
into the Kubernetes API models (the `kubernetes` package), for one node and for a stage on two nodes (an
Indexed Job and its headless Service). No cluster or engine runs here."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from kubernetes.client import ApiClient, V1Job, V1Service
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.templating import apply_values
from prefect.workers.process import ProcessJobConfiguration
from prefect_docker.worker import DockerWorkerJobConfiguration
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from flows.config import PipelineConfig
from flows.launchers import StageJob, deployment_job_variables
from flows.node import node_command
from flows.resources import (
    Resources,
    docker_job_variables,
    docker_run_kwargs,
    kubernetes_job_variables,
    kubernetes_node_service,
    quantity_bytes,
)
from stages.common.config import ConfigError, load_config
from tests.helpers import REPO

GPU_STAGE = Resources(cpus=8, memory="64Gi", shm_size="16Gi", gpus=1,
                      node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                      tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


def _configure(cls, kind: str, values: dict):
    """What the worker does with a flow run's job variables (`from_template_and_values`), minus its
    lookup of block and variable references, which needs a Prefect server and none are used here."""
    template = _template(kind)
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return cls(**apply_values(template["job_configuration"], {**defaults, **values}))


def _template(kind: str) -> dict:
    return json.loads((REPO / "infra" / "work-pools" / f"{kind}.json").read_text())


def test_quantities():
    assert quantity_bytes("512Mi") == 512 * 2**20
    assert quantity_bytes("2G") == 2 * 10**9
    assert quantity_bytes("1.5Gi") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="512Mi, 8Gi or 2G"):
        quantity_bytes("lots")


def test_a_bad_quantity_in_a_config_names_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("flow:\n  sft:\n    resources:\n      memory: lots\n")
    with pytest.raises(ConfigError, match=r"flow\.sft\.resources\.memory"):
        load_config(PipelineConfig, cfg)


def test_docker_sdk_arguments():
    kw = docker_run_kwargs(GPU_STAGE)
    assert kw["nano_cpus"] == 8 * 10**9
    assert kw["mem_limit"] == kw["memswap_limit"] == 64 * 2**30
    assert kw["shm_size"] == 16 * 2**30
    assert kw["device_requests"] == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    assert docker_run_kwargs(Resources()) == {}


def test_docker_work_pool_job_configuration():
    values = {"image": "ufo-sft:latest", **docker_job_variables(GPU_STAGE)}
    cfg = _configure(DockerWorkerJobConfiguration, "docker", values)
    assert cfg.mem_limit == str(64 * 2**30) and cfg.network_mode == "host"
    create = cfg.container_create_kwargs
    assert create["entrypoint"] == ["/usr/bin/env"]  # `prefect flow-run execute` past the stage ENTRYPOINT
    assert create["device_requests"] == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    assert create["shm_size"] == 16 * 2**30 and create["nano_cpus"] == 8 * 10**9
    plain = _configure(DockerWorkerJobConfiguration, "docker", {"image": "ufo-curate"})
    assert plain.container_create_kwargs == {"entrypoint": ["/usr/bin/env"]}  # nothing asked, nothing set


def test_process_work_pool_runs_the_flow_command_in_the_given_folder(tmp_path):
    # A process pool's worker runs each flow run as a process of its own host: from a checkout with
    # the project installed, the module-path entrypoints of `ufo deploy` resolve there.
    cfg = _configure(ProcessJobConfiguration, "process", {"working_dir": str(tmp_path), "env": {"A": "1"}})
    assert cfg.working_dir == tmp_path and cfg.env == {"A": "1"} and cfg.stream_output


def _job(resources: Resources) -> V1Job:
    values = {"image": "ufo-sft:latest", **kubernetes_job_variables(resources)}
    cfg = _configure(KubernetesWorkerJobConfiguration, "kubernetes", values)
    return ApiClient()._ApiClient__deserialize(cfg.job_manifest, "V1Job")


def test_kubernetes_job_for_a_one_gpu_stage():
    job = _job(GPU_STAGE)
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == "ufo-sft:latest"
    assert container.resources.limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert container.resources.requests == {"cpu": "8", "memory": "64Gi"}
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    (tol,) = pod.tolerations
    assert (tol.key, tol.operator, tol.effect) == ("nvidia.com/gpu", "Exists", "NoSchedule")
    (shm,) = [v for v in pod.volumes if v.name == "dshm"]
    assert shm.empty_dir.medium == "Memory" and shm.empty_dir.size_limit == "16Gi"
    assert [m.mount_path for m in container.volume_mounts] == ["/dev/shm"]
    assert container.command == ["/usr/bin/env", "python", "-m", "flows.node"]  # past the stage ENTRYPOINT


def test_kubernetes_job_for_a_stage_that_asks_for_nothing():
    pod = _job(Resources()).spec.template.spec
    (container,) = pod.containers
    assert not container.resources.limits and "nvidia.com/gpu" not in (container.resources.limits or {})
    assert not pod.node_selector and not pod.tolerations


def _flow_run_job(values: dict) -> V1Job:
    """The Job a Kubernetes worker would create for one flow run: the template rendered with `values`, then
    prepared as the worker prepares it (Prefect's env merged into the template's, the flow-run command)."""
    cfg = _configure(KubernetesWorkerJobConfiguration, "kubernetes", values)
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="rl-3f2a"))
    return ApiClient()._ApiClient__deserialize(cfg.job_manifest, "V1Job")


def _pod_env(container, index: int, job_name: str) -> dict[str, str]:
    """What the kubelet makes of `container.env` in pod `index` of the Indexed Job `job_name`: `fieldRef`s
    read from the metadata the Job controller gives the pod, then `$(VAR)` expanded from earlier entries
    only (an entry that names a later one stays literal, as in Kubernetes)."""
    metadata = {"metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
                "metadata.labels['batch.kubernetes.io/job-name']": job_name}
    env: dict[str, str] = {}
    for var in container.env:
        if var.value_from is not None:
            env[var.name] = metadata[var.value_from.field_ref.field_path]
        else:
            env[var.name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var.value)
    return env


def test_kubernetes_indexed_job_for_a_stage_on_two_nodes(tmp_path):
    resources = Resources(cpus=32, memory="480Gi", shm_size="64Gi", gpus=8, nodes=2,
                          node_selector=GPU_STAGE.node_selector, tolerations=GPU_STAGE.tolerations)
    stage = StageJob(stage="rl", config={"engine": {"kind": "deepspeed", "num_processes": 8}}, run_id="run1",
                     parent_run_id="parent1", workdir=tmp_path, resources=resources)
    variables = deployment_job_variables(stage, "kubernetes", "ufo-k8s", "http://mlflow.ufo:5000")
    job = _flow_run_job({"image": "registry.example/ufo-rl:abc", **variables})
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 2, 2)
    assert job.spec.backoff_limit == 0  # one pod failing fails the Job, and Kubernetes stops the other
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.resources.limits == {"cpu": "32", "memory": "480Gi", "nvidia.com/gpu": "8"}
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    (tol,) = pod.tolerations
    assert (tol.key, tol.operator, tol.effect) == ("nvidia.com/gpu", "Exists", "NoSchedule")
    (shm,) = [v for v in pod.volumes if v.name == "dshm"]
    assert shm.empty_dir.medium == "Memory" and shm.empty_dir.size_limit == "64Gi"
    assert [m.mount_path for m in container.volume_mounts] == ["/dev/shm"]

    # The headless Service through which pod k is `<job>-k.<subdomain>`: it selects these pods.
    service = ApiClient()._ApiClient__deserialize(kubernetes_node_service("ml"), "V1Service")
    assert isinstance(service, V1Service) and service.spec.cluster_ip == "None"
    assert service.metadata.name == pod.subdomain and service.metadata.namespace == "ml"
    assert service.spec.selector.items() <= job.spec.template.metadata.labels.items()
    assert service.spec.publish_not_ready_addresses

    job_name = "rl-3f2a-x7k2q"  # what generateName makes of the Job's name
    node0 = f"{job_name}-0.{pod.subdomain}"  # the Job controller names pod k's host `<job>-k`
    commands = []
    for k in range(2):
        env = _pod_env(container, k, job_name)
        assert env["UFO_NODE_RANK"] == str(k) and env["MASTER_ADDR"] == node0 and env["MASTER_PORT"] == "29500"
        assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ufo:5000"
        assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "crash"  # not rescheduled onto node 0 alone
        commands.append(node_command(container.args, env))
    # Node 0 executes the flow run (which runs the stage); node 1 runs the stage, which follows node 0.
    assert container.command[-2:] == ["-m", "flows.node"]
    assert commands[0] == ["prefect", "flow-run", "execute"]
    assert commands[1][1:3] == ["-m", "stages.rl"] and commands[1][3:] == stage.args()


def test_kubernetes_job_for_one_node_is_the_flow_run_on_one_pod():
    job = _flow_run_job({"image": "ufo-sft:latest", **kubernetes_job_variables(GPU_STAGE)})
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 1, 1)
    (container,) = job.spec.template.spec.containers
    env = _pod_env(container, 0, "sft-1-abcde")
    assert env["UFO_NODE_RANK"] == "0" and "UFO_STAGE" not in env
    assert node_command(container.args, env) == ["prefect", "flow-run", "execute"]
