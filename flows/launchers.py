"""How a stage runs, chosen by `flow.launcher`: a local process, a Docker container, or a Prefect
deployment on a work pool. Every launcher runs the same command, `python -m stages.<name>`, logging
into the MLflow run the flow created for it, and reports how it ended; the flow does the rest (reads
the Output from MLflow, closes the run if the stage could not, retries).

The launchers differ only in how they start and observe what they started. Watching it, relaying its
lines, its timeout and its stop on an interrupt (SIGTERM, a grace period, SIGKILL, whether or not the
stage prints anything) are `stages.common.processes.watch`'s, and how it ended is worded by one
function here (`_result`). A stage on several nodes (`flow.<stage>.resources.nodes`) is, to `watch`, one
`processes.Group` of its nodes' containers.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from flows.cache import code_digest
from flows.config import FlowConfig
from flows.credentials import client_secrets, secrets_file
from flows.node import FOLLOW_ARGS_ENV, FOLLOW_STAGE_ENV
from flows.resources import (
    Resources,
    docker_job_variables,
    docker_run_kwargs,
    kubernetes_job_variables,
    quantity_bytes,
)
from flows.server import require_tracking_server
from stages.common.config import ConfigError
from stages.common.processes import (
    DEFAULT_MASTER_PORT,
    MASTER_PORT_ENV,
    REPO_ROOT,
    Group,
    Outcome,
    describe_exit,
    node_env,
    pump_lines,
    spawn,
    stage_args,
    stage_command,
    stage_env,
    watch,
)
from stages.common.runtime import SECRETS_FILE_IN_CONTAINER
from stages.common.workspace import workspace

LABEL_STAGE = "ai.ufo.stage"
LABEL_CODE = "ai.ufo.code-digest"
LABEL_RUN = "ai.ufo.run-id"
LABEL_NODE = "ai.ufo.node"
#: What the collective backends of a node's ranks need on a Docker network: the interface that carries
#: the traffic between nodes (each container has one, eth0).
NODE_NETWORK_ENV = {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
#: /dev/shm of a node's container unless `resources.shm_size` says: Docker's 64 MB is too small for
#: NCCL's and DeepSpeed's shared-memory transports between the ranks of one node.
NODE_SHM_SIZE = "1Gi"

Log = Callable[[str], None]


@dataclass
class StageJob:
    """One attempt of one stage, as the flow hands it to a launcher."""

    stage: str
    config: dict[str, Any]
    """The stage's resolved config, upstream Outputs included (JSON-able)."""
    run_id: str
    """The RUNNING MLflow run the stage logs into."""
    parent_run_id: str
    workdir: Path
    """Where the local launcher writes the stage's config file."""
    timeout_seconds: float | None = None
    grace_seconds: float = 10.0
    resources: Resources = field(default_factory=Resources)

    def args(self) -> list[str]:
        """The stage's command-line arguments (after `python -m stages.<name>`), config inline."""
        return stage_args(config=self.config, run_id=self.run_id, parent_run_id=self.parent_run_id)


@dataclass
class LaunchResult:
    returncode: int | None
    failure: str | None = None
    """Why the stage did not succeed (None when it did): exit code, signal, timeout, OOM kill."""
    tail: list[str] = field(default_factory=list)
    """Its last output lines."""

    @property
    def ok(self) -> bool:
        return self.failure is None


class Launcher(Protocol):
    name: str

    def launch(self, job: StageJob, log: Log) -> LaunchResult: ...


class _Tail:
    """Relays lines to the flow's log and keeps the last few for the error message."""

    def __init__(self, stage: str, log: Log, keep: int = 20):
        self.stage, self.log = stage, log
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)

    def __call__(self, line: str) -> None:
        line = line.rstrip()
        if line:
            self.lines.append(line)
            self.log(f"[{self.stage}] {line}")


def _result(outcome: Outcome, job: StageJob, tail: list[str], failure: str | None = None) -> LaunchResult:
    """How the stage ended, in the same words whatever ran it; `failure`: what the launcher saw that an
    exit code does not say (an OOM kill, a flow run's final state)."""
    if outcome.timed_out:
        failure = f"timed out after {job.timeout_seconds:g} s (flow.<stage>.timeout_seconds) and was stopped"
    elif failure is None and outcome.returncode != 0:
        failure = describe_exit(outcome.returncode)
    return LaunchResult(outcome.returncode, failure, tail)


class LocalLauncher:
    """Each stage a child process of the flow: `python -m stages.<name> --config FILE --run-id ID`."""

    name = "local"

    def launch(self, job: StageJob, log: Log) -> LaunchResult:
        cfg_path = job.workdir / f"{job.stage}.config.json"
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job.config, indent=2))
        tmp.replace(cfg_path)
        cmd = stage_command(job.stage, config_file=cfg_path, run_id=job.run_id, parent_run_id=job.parent_run_id)
        log(f"$ {' '.join(cmd)}")
        tail = _Tail(job.stage, log)
        child = spawn(cmd, env=stage_env(), cwd=REPO_ROOT)
        outcome = watch(child, tail, timeout_seconds=job.timeout_seconds, grace_seconds=job.grace_seconds)
        return _result(outcome, job, list(tail.lines))


class _Container:
    """A stage's container as `watch` reads it: its log stream, its state, `docker stop`."""

    def __init__(self, container):
        self.container = container
        self.lines: queue.Queue[str | None] = queue.Queue()
        pump_lines(self._log_chunks(), self.lines, decode=True)

    def _log_chunks(self):
        yield from self.container.logs(stream=True, follow=True)  # opened in the pump's thread

    def poll(self) -> int | None:
        self.container.reload()
        if self.container.status in ("exited", "dead"):
            return self.container.attrs["State"].get("ExitCode")
        return None

    @property
    def ended_at(self) -> str:
        """When it ended (Docker's RFC 3339 time, which sorts in time order)."""
        return self.container.attrs["State"].get("FinishedAt") or ""

    def stop(self, grace_seconds: float) -> None:
        # Docker's own stop is the same rule: SIGTERM, the grace period, SIGKILL.
        self.container.stop(timeout=int(grace_seconds))

    def oom_killed(self) -> bool:
        self.container.reload()
        return bool(self.container.attrs["State"].get("OOMKilled"))


class DockerLauncher:
    """Each stage a container of its own image (`<image_prefix>-<stage>:<tag>`), through the Docker SDK.

    Containers share the host's network, so they reach the MLflow server at the URI the flow uses; they
    read nothing from host paths: inputs come by URI from MLflow, the config on the command line. The one
    exception is the MLflow credentials (MLFLOW_TRACKING_USERNAME/PASSWORD of the flow's environment): a
    file made for the attempt, mounted read-only and removed when the container is (`_secrets_volume`).
    """

    name = "docker"

    def __init__(self, flow: FlowConfig, tracking_uri: str):
        require_tracking_server(tracking_uri, self.name)
        import docker

        self.flow, self.tracking_uri = flow, tracking_uri
        self.client = docker.from_env()

    def image(self, stage: str) -> str:
        """The stage's image, refusing one that is missing or was built from other code."""
        import docker

        name = self.flow.image(stage)
        try:
            img = self.client.images.get(name)
        except docker.errors.ImageNotFound:
            raise ConfigError(f"flow.launcher: image {name} not found; build it with `make images`") from None
        built, expected = (img.labels or {}).get(LABEL_CODE), code_digest(stage)
        if built != expected:
            raise ConfigError(f"flow.launcher: image {name} was built from other code (code digest "
                              f"{(built or 'none')[:12]}, this checkout {expected[:12]}); rebuild with `make images`")
        return name

    def launch(self, job: StageJob, log: Log) -> LaunchResult:
        image = self.image(job.stage)
        with secrets_file(workspace() / "secrets", client_secrets()) as secrets:
            if job.resources.nodes > 1:
                return self._launch_nodes(job, log, image, secrets)
            return self._launch_one(job, log, image, secrets)

    def _launch_one(self, job: StageJob, log: Log, image: str, secrets: Path | None) -> LaunchResult:
        log(f"$ docker run {image} {job.stage} --run-id {job.run_id}")
        container = self.client.containers.run(
            image, command=job.args(), detach=True, environment=stage_env(self.tracking_uri, inherit=False),
            network_mode="host", name=f"ufo-{job.stage}-{job.run_id[:12]}",
            labels={LABEL_STAGE: job.stage, LABEL_RUN: job.run_id}, volumes=_secrets_volume(secrets),
            **docker_run_kwargs(job.resources))
        try:
            handle, tail = _Container(container), _Tail(job.stage, log)
            outcome = watch(handle, tail, timeout_seconds=job.timeout_seconds, grace_seconds=job.grace_seconds,
                            poll_seconds=0.5)
            return _result(outcome, job, list(tail.lines), _oom(job, "the container") if handle.oom_killed() else None)
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)


    def _launch_nodes(self, job: StageJob, log: Log, image: str, secrets: Path | None) -> LaunchResult:
        """One container per node on a Docker network made for this attempt; node 0 runs the stage and hosts
        the rendezvous at its container name (stages/common/rank.py). The stage ends when every node ended
        with 0, or as soon as one did not: then the others are stopped. Containers and network are removed
        whatever happens."""
        nodes = job.resources.nodes
        require_reachable_from_containers(self.tracking_uri, f"flow.{job.stage}.resources.nodes")
        name = f"ufo-{job.stage}-{job.run_id[:12]}"
        labels = {LABEL_STAGE: job.stage, LABEL_RUN: job.run_id}
        run_kwargs = {"shm_size": quantity_bytes(NODE_SHM_SIZE)} | docker_run_kwargs(job.resources)
        network = self.client.networks.create(name, driver="bridge", labels=labels)
        containers: dict[str, Any] = {}
        group = None
        try:
            for k in range(nodes):
                env = stage_env(self.tracking_uri, inherit=False) | node_env(k, f"{name}-node0") | NODE_NETWORK_ENV
                log(f"$ docker run --network {name} {image} {job.stage} --run-id {job.run_id}  # node {k} of {nodes}")
                containers[f"node {k}"] = self.client.containers.run(
                    image, command=job.args(), detach=True, environment=env, network=name, name=f"{name}-node{k}",
                    hostname=f"{name}-node{k}", labels={**labels, LABEL_NODE: str(k)}, volumes=_secrets_volume(secrets),
                    **run_kwargs)
            group = Group({node: _Container(c) for node, c in containers.items()})
            tail = _Tail(job.stage, log)
            outcome = watch(group, tail, timeout_seconds=job.timeout_seconds, grace_seconds=job.grace_seconds,
                            poll_seconds=0.5)
            failure, lines = None, list(tail.lines)
            if group.failed is not None:
                member = group.members[group.failed]
                failure = f"{group.failed} of {nodes} {describe_exit(outcome.returncode)}"
                if member.oom_killed():
                    failure = f"{group.failed} of {nodes} was {_oom(job, 'its container')}"
                lines = [f"[{group.failed}] {line}" for line in group.tails[group.failed]]
            return _result(outcome, job, lines, failure)
        finally:
            if group is not None:
                group.stop(job.grace_seconds)  # the nodes still running, all at once
            for container in containers.values():
                with contextlib.suppress(Exception):
                    container.remove(force=True)
            with contextlib.suppress(Exception):
                network.remove()


def _secrets_volume(secrets: Path | None) -> dict[str, dict[str, str]]:
    """The bind mount of the MLflow credentials file, read-only where the stage looks for it
    (`stages.common.runtime.load_secrets_file`): not environment variables, which `docker inspect` shows to
    whoever may use Docker, nor labels, nor image layers."""
    return {str(secrets): {"bind": SECRETS_FILE_IN_CONTAINER, "mode": "ro"}} if secrets else {}


def _oom(job: StageJob, container: str) -> str:
    return (f"OOM-killed: {container} went over its memory limit (flow.{job.stage}.resources.memory = "
            f"{job.resources.memory})")


def require_reachable_from_containers(uri: str, field: str) -> None:
    """A ConfigError unless the server at `uri` can be reached from a container on a Docker network of its
    own: a loopback address is the container's own, not this machine's."""
    host = (urlsplit(uri).hostname or "").lower()
    with contextlib.suppress(ValueError):  # a name, not an address
        host = "localhost" if ipaddress.ip_address(host).is_loopback else host
    if host == "localhost":
        raise ConfigError(f"{field}: each node runs in a container on a Docker network of its own, which cannot "
                          f"reach the tracking server {uri} (this machine's loopback address); run the servers on "
                          "an address the containers reach, the Docker bridge's gateway (`ufo stack up --listen "
                          "docker`, then `source .ufo/stack/env.sh`)")


class _FlowRun:
    """A deployment's flow run as `watch` reads it: its state (its log stays in Prefect), cancelled to stop.

    A flow run that no worker takes is noticed (`unclaimed`): still Scheduled, Late or Pending
    `claim_seconds` after it was created, while no worker of its pool has sent a heartbeat for as long. It
    is then marked Crashed and `poll` says it failed, so a dead worker costs the pipeline about a minute,
    not the stage's timeout (which defaults to none)."""

    def __init__(self, client, flow_run, pool: str, claim_seconds: float):
        self.client, self.flow_run, self.pool, self.claim_seconds = client, flow_run, pool, claim_seconds
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.lines.put(None)
        self.unclaimed: str | None = None
        self._since = time.monotonic()

    def poll(self) -> int | None:
        self.flow_run = self.client.read_flow_run(self.flow_run.id)
        state = self.flow_run.state
        if state is None or not state.is_final():
            if state is not None and (state.is_scheduled() or state.is_pending()) and self._unclaimed():
                return 1
            return None
        return 0 if state.is_completed() else 1

    def _unclaimed(self) -> bool:
        waited = time.monotonic() - self._since
        if waited < self.claim_seconds:
            return False
        from prefect.states import Crashed

        now, workers = time.time(), self.client.read_workers_for_work_pool(self.pool)
        beats = [w.last_heartbeat_time.timestamp() for w in workers if w.last_heartbeat_time is not None]
        # A live worker may be busy (the pool's concurrency limit): then the run waits for its turn. Workers
        # beat every PREFECT_WORKER_HEARTBEAT_SECONDS (30 s by default): two missed beats is a dead worker.
        window = max(self.claim_seconds, 2 * max((w.heartbeat_interval_seconds or 30 for w in workers), default=30))
        if beats and now - max(beats) < window:
            return False
        last = f"{now - max(beats):.0f} s ago" if beats else "never"
        self.unclaimed = (f"flow run {self.flow_run.name} was not started by any worker of work pool {self.pool} "
                          f"within {waited:.0f} s (flow.deployment_claim_seconds = {self.claim_seconds:g}; still "
                          f"{self.flow_run.state.name}), and no worker of the pool has sent a heartbeat since {last}: "
                          f"is its worker running (`ufo stack status`; `ufo stack restart worker`)? Marked it Crashed")
        self.client.set_flow_run_state(self.flow_run.id, Crashed(message=self.unclaimed), force=True)
        return True

    def stop(self, grace_seconds: float) -> None:
        """Cancel the run: its worker stops the stage (SIGTERM, grace, SIGKILL); wait for it as long."""
        from prefect.states import Cancelling

        self.client.set_flow_run_state(self.flow_run.id, Cancelling(), force=True)
        end = time.monotonic() + grace_seconds
        while self.poll() is None and time.monotonic() < end:
            time.sleep(1.0)

    def tail(self) -> list[str]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        try:
            logs = self.client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run.id])))
            # The stage's own lines ([stage] ...), each cut short: the full log is in Prefect.
            lines = [line for entry in logs for line in entry.message.splitlines() if line.startswith("[")]
            return [line[:300] for line in lines[-20:]]
        except Exception:
            return []


class DeploymentLauncher:
    """Each stage a flow run of the Prefect deployment `<deployment_flow>/<stage>` (`ufo deploy`),
    started from the pipeline's flow run (it shows as its child in the Prefect UI) and run by the
    work pool's worker: a process, a Docker container, a Kubernetes Job."""

    name = "deployment"

    def __init__(self, flow: FlowConfig, tracking_uri: str):
        require_tracking_server(tracking_uri, self.name)
        self.flow, self.tracking_uri = flow, tracking_uri

    def _job_variables(self, client, job: StageJob, deployment) -> dict[str, Any]:
        pool = client.read_work_pool(deployment.work_pool_name)
        return deployment_job_variables(job, pool.type, pool.name, self.tracking_uri,
                                        (deployment.job_variables or {}).get("env", {}))

    def launch(self, job: StageJob, log: Log) -> LaunchResult:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        name = f"{self.flow.deployment_flow}/{job.stage}"
        with get_client(sync_client=True) as client:
            try:
                deployment = client.read_deployment_by_name(name)
            except Exception:
                raise ConfigError(f"flow.launcher: no Prefect deployment {name}; register it with "
                                  "`ufo deploy CONFIG --pool POOL`") from None
            job_vars = self._job_variables(client, job, deployment)
            params = {"stage": job.stage, "config": job.config, "run_id": job.run_id,
                      "parent_run_id": job.parent_run_id, "code_digest": code_digest(job.stage),
                      "grace_seconds": job.grace_seconds}
            # timeout=0: create the flow run and return; waiting is ours, so timeouts and interrupts are too.
            flow_run = run_deployment(name, parameters=params, job_variables=job_vars, timeout=0,
                                      idempotency_key=f"ufo-stage-{job.run_id}")
            log(f"{job.stage}: flow run {flow_run.name} ({flow_run.id}) of deployment {name}")
            handle = _FlowRun(client, flow_run, deployment.work_pool_name, self.flow.deployment_claim_seconds)
            outcome = watch(handle, log, timeout_seconds=job.timeout_seconds, grace_seconds=job.grace_seconds,
                            poll_seconds=1.0)
            if outcome.returncode == 0 and not outcome.timed_out:
                return _result(outcome, job, [])
            state = handle.flow_run.state
            ended = handle.unclaimed or (f"flow run {flow_run.name} ended {state.name}" if state is not None else None)
            return _result(outcome, job, handle.tail(), ended)


def deployment_job_variables(job: StageJob, pool_type: str, pool_name: str, tracking_uri: str,
                             deployment_env: dict[str, str] | None = None) -> dict[str, Any]:
    """A stage's flow-run job variables on a `pool_type` pool: its resource variables, plus the environment
    the stage needs wherever it runs (over the deployment's own `env`).

    Several nodes need a Kubernetes pool, whose template (infra/work-pools/kubernetes.json) makes the flow
    run an Indexed Job of `nodes` pods and gives each its node rank and MASTER_ADDR. To that this adds what
    is the same on every pod: the rendezvous port, the interface between pods, what the nodes other than 0
    run (flows/node.py), and how node 0's flow run ends when Kubernetes stops it.
    """
    nodes = job.resources.nodes
    if nodes > 1 and pool_type != "kubernetes":
        raise ConfigError(f"flow.{job.stage}.resources.nodes: {nodes} nodes need a Kubernetes work pool (an Indexed "
                          f"Job of one pod per node); {pool_name} is a {pool_type} pool, whose worker starts one "
                          "process or container per flow run. Use flow.launcher docker for several nodes on this "
                          "machine")
    resources = {"docker": docker_job_variables, "kubernetes": kubernetes_job_variables}.get(pool_type)
    variables = resources(job.resources) if resources else {}
    env = {**(deployment_env or {}), **stage_env(tracking_uri, inherit=False)}
    if nodes > 1:
        env |= {MASTER_PORT_ENV: str(DEFAULT_MASTER_PORT), **NODE_NETWORK_ENV,
                FOLLOW_STAGE_ENV: job.stage, FOLLOW_ARGS_ENV: json.dumps(job.args()),
                # When one pod fails, the Job fails and Kubernetes stops the others. Node 0's flow run must then
                # end Crashed, so the pipeline's retry starts a fresh attempt of every node; prefect-kubernetes'
                # default on a Job without retries (`reschedule`) would rerun node 0 alone into the closed run.
                "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "crash"}
    return variables | {"env": env}


def make_launcher(flow: FlowConfig, tracking_uri: str) -> Launcher:
    if flow.launcher == "docker":
        return DockerLauncher(flow, tracking_uri)
    if flow.launcher == "deployment":
        return DeploymentLauncher(flow, tracking_uri)
    return LocalLauncher()
