"""What a stage asks of the machine it runs on, typed, and compiled for each engine.

Users write `flow.<stage>.resources` (CPUs, memory, shared memory, GPUs, node selector, tolerations)
once; `docker_run_kwargs` turns it into Docker SDK arguments (the `docker` launcher),
`docker_job_variables` into a Prefect Docker work pool's job variables and `kubernetes_job_variables`
into the variables of `infra/work-pools/kubernetes.json` (the `deployment` launcher). Nobody writes
job variables by hand. A stage on several nodes of a Kubernetes pool also needs the headless Service of
`kubernetes_node_service`, created once per namespace.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common.config import StrictModel

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?$")
#: The headless Service through which the pods of a multi-node stage find each other: the pod template's
#: subdomain (the `node_service` variable of infra/work-pools/kubernetes.json) and label.
NODE_SERVICE = "ufo-nodes"
NODE_SERVICE_LABEL = "ai.ufo.node-service"
_FACTORS = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str) -> int:
    """Bytes in a Kubernetes memory quantity: `512Mi` -> 536870912, `1G` -> 10**9, `1024` -> 1024."""
    m = _QUANTITY.fullmatch(quantity.strip())
    if not m:
        raise ValueError(f"{quantity!r} is not a memory quantity such as 512Mi, 8Gi or 2G")
    return math.ceil(float(m.group(1)) * _FACTORS[m.group(2)])


class Toleration(StrictModel):
    """A Kubernetes toleration: lets the stage's pod run on nodes tainted for it (e.g. GPU nodes)."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Resources(StrictModel):
    """Resources of one stage. Unset fields leave the engine's default (no limit)."""

    cpus: float | None = Field(None, gt=0)
    """CPU cores: Docker's `--cpus` (a CFS quota) and the Kubernetes cpu request and limit. Stages size
    their torch thread pool to it (see stages/common/runtime.py)."""
    memory: str | None = None
    """Memory limit as a Kubernetes quantity (`512Mi`, `8Gi`). A container over it is OOM-killed and
    the stage fails saying so."""
    shm_size: str | None = None
    """Size of /dev/shm (`2Gi`). Docker's default is 64 MB, too small for NCCL and DataLoader workers;
    on Kubernetes it becomes a memory-backed emptyDir mounted at /dev/shm."""
    gpus: int = Field(0, ge=0)
    """NVIDIA GPUs per node: Docker `device_requests`, Kubernetes `nvidia.com/gpu` limit."""
    nodes: int = Field(1, ge=1)
    """Machines the stage's ranks span (sft and rl only), each with the `cpus`, `memory`, `shm_size` and
    `gpus` above and `<stage>.engine.num_processes` ranks. > 1: the `docker` launcher starts one container
    per node on a Docker network of the stage's own; on a Kubernetes work pool (`deployment` launcher)
    the stage is an Indexed Job of that many pods (infra/README.md). The flow copies it into
    `<stage>.engine.nodes`."""
    node_selector: dict[str, str] = {}
    """Kubernetes node labels the pod must match, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}."""
    tolerations: list[Toleration] = []
    """Kubernetes taints the pod tolerates, e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]."""

    @field_validator("memory", "shm_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None:
            quantity_bytes(v)  # raises with the accepted forms
        return v


def docker_run_kwargs(r: Resources) -> dict[str, Any]:
    """Keyword arguments for docker-py's `containers.run/create`."""
    kw: dict[str, Any] = {}
    if r.cpus is not None:
        kw["nano_cpus"] = int(r.cpus * 1e9)
    if r.memory is not None:
        kw["mem_limit"] = quantity_bytes(r.memory)
        kw["memswap_limit"] = quantity_bytes(r.memory)  # no swap: over the limit means OOM, not thrashing
    if r.shm_size is not None:
        kw["shm_size"] = quantity_bytes(r.shm_size)
    if r.gpus:
        kw["device_requests"] = [{"driver": "nvidia", "count": r.gpus, "capabilities": [["gpu"]]}]
    return kw


def docker_job_variables(r: Resources) -> dict[str, Any]:
    """Job variables for a Docker work pool created from `infra/work-pools/docker.json`.

    Memory goes to prefect-docker's own `mem_limit`/`memswap_limit`; CPUs, shared memory and GPUs to
    that template's `nano_cpus`, `shm_size` and `device_requests`, which it hands to docker-py.
    """
    kw = docker_run_kwargs(r)
    for key in ("mem_limit", "memswap_limit"):
        if key in kw:
            kw[key] = str(kw[key])
    return kw


def kubernetes_job_variables(r: Resources) -> dict[str, Any]:
    """Values for the variables of `infra/work-pools/kubernetes.json` (see its `variables` section)."""
    limits: dict[str, str] = {}
    if r.cpus is not None:
        limits["cpu"] = f"{r.cpus:g}"
    if r.memory is not None:
        limits["memory"] = r.memory
    if r.gpus:
        limits["nvidia.com/gpu"] = str(r.gpus)
    out: dict[str, Any] = {"resource_limits": limits,
                           # requests = limits: the scheduler places the pod where it really fits
                           "resource_requests": {k: v for k, v in limits.items() if k != "nvidia.com/gpu"}}
    if r.shm_size is not None:
        out["shm_size"] = r.shm_size
    if r.nodes > 1:
        out["nodes"] = r.nodes  # the Indexed Job's completions and parallelism: one pod per node
    if r.node_selector:
        out["node_selector"] = dict(r.node_selector)
    if r.tolerations:
        out["tolerations"] = [t.model_dump(exclude_none=True) for t in r.tolerations]
    return out


def kubernetes_node_service(namespace: str = "default", name: str = NODE_SERVICE) -> dict[str, Any]:
    """The headless Service (a Kubernetes manifest) that gives each pod of a multi-node stage a DNS name.

    Prefect's Kubernetes worker creates one object per flow run, the Job; this Service is the namespace's,
    created once beside the work pool (`kubectl apply`, infra/README.md) and shared by every stage's Job.
    An Indexed Job's pod k is named `<job>-k` as a host; with `subdomain: <name>` and this Service
    selecting it, `<job>-k.<name>` resolves to its address, so node 0 (`<job>-0.<name>`) is MASTER_ADDR.
    Job names are unique, so concurrent stages share the Service without clashing.

    `publishNotReadyAddresses`: the other nodes look node 0 up as soon as they start, before any
    readiness; a pod without that flag is only in DNS once ready. No ports: a headless Service with a
    selector publishes the pods' addresses, and the rendezvous port (MASTER_PORT) is the pods' own.
    """
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": {NODE_SERVICE_LABEL: name}},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {NODE_SERVICE_LABEL: name}}}
