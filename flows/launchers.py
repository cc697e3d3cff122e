"""How a stage runs, chosen by `flow.launcher`: a local process, a Docker container, or a Prefect
deployment on a work pool. Every launcher runs the same command, `python -m stages.<name>`, logging
into the MLflow run the flow created for it, and reports how it ended; the flow does the rest (reads
the Output from MLflow, closes the run if the stage could not, retries).

Each launcher stops what it started on a timeout or an interrupt (SIGTERM, a grace period, SIGKILL),
whether or not the stage prints anything.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flows.cache import code_digest
from flows.config import FlowConfig
from flows.processes import spawn, watch
from flows.resources import Resources, docker_job_variables, docker_run_kwargs, kubernetes_job_variables
from stages.common.config import ConfigError
from stages.common.runtime import check_stop

REPO_ROOT = Path(__file__).resolve().parents[1]
LABEL_STAGE = "ai.ufo.stage"
LABEL_CODE = "ai.ufo.code-digest"
LABEL_RUN = "ai.ufo.run-id"

Log = Callable[[str], None]
#: Settings of this process that a stage in a container or under a worker must see too.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "UFO_THREADS", "UFO_FAILPOINT")


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
        return ["--config-json", json.dumps(self.config), "--run-id", self.run_id,
                "--parent-run-id", self.parent_run_id]


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


def describe_exit(code: int | None) -> str:
    """`exited with code 1`, `killed by SIGKILL`; docker reports signals as 128+N."""
    if code is None:
        return "did not exit"
    signum = -code if code < 0 else code - 128 if code > 128 else None
    if signum:
        try:
            return f"killed by {signal.Signals(signum).name} (exit code {code})"
        except ValueError:
            pass
    return f"exited with code {code}"


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


def stage_env() -> dict[str, str]:
    """The environment of a local stage process: this one's, plus the repository on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see stages/common/runtime.py: prepare_process
    # Progress bars are noise in a log stream.
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def _finish(outcome_code: int | None, timed_out: bool, timeout: float | None, tail: _Tail,
            oom: str | None = None) -> LaunchResult:
    if timed_out:
        failure = f"timed out after {timeout:g} s (flow.<stage>.timeout_seconds) and was stopped"
    elif oom:
        failure = oom
    elif outcome_code == 0:
        failure = None
    else:
        failure = describe_exit(outcome_code)
    return LaunchResult(outcome_code, failure, list(tail.lines))


class LocalLauncher:
    """Each stage a child process of the flow: `python -m stages.<name> --config FILE --run-id ID`."""

    name = "local"

    def launch(self, job: StageJob, log: Log) -> LaunchResult:
        cfg_path = job.workdir / f"{job.stage}.config.json"
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job.config, indent=2))
        tmp.replace(cfg_path)
        cmd = [sys.executable, "-m", f"stages.{job.stage}", "--config", str(cfg_path), "--run-id", job.run_id,
               "--parent-run-id", job.parent_run_id]
        log(f"$ {' '.join(cmd)}")
        tail = _Tail(job.stage, log)
        proc = spawn(cmd, env=stage_env(), cwd=str(REPO_ROOT))
        outcome = watch(proc, tail, timeout_seconds=job.timeout_seconds, grace_seconds=job.grace_seconds)
        return _finish(outcome.returncode, outcome.timed_out, job.timeout_seconds, tail)


class DockerLauncher:
    """Each stage a container of its own image (`<image_prefix>-<stage>:<tag>`), through the Docker SDK.

    Containers share the host's network, so they reach the MLflow server at the URI the flow uses; they
    read nothing from host paths: inputs come by URI from MLflow, the config on the command line.
    """

    name = "docker"

    def __init__(self, flow: FlowConfig, tracking_uri: str):
        if not tracking_uri.startswith(("http://", "https://")):
            raise ConfigError(
                f"flow.launcher: docker runs stages in containers, which cannot reach the tracking store "
                f"{tracking_uri}; set MLFLOW_TRACKING_URI to an MLflow server that serves artifacts "
                "(`ufo stack up` starts one)")
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
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri, "PYTHONUNBUFFERED": "1",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        env |= {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        log(f"$ docker run {image} {job.stage} --run-id {job.run_id}")
        container = self.client.containers.run(
            image, command=job.args(), detach=True, environment=env, network_mode="host",
            name=f"ufo-{job.stage}-{job.run_id[:12]}",
            labels={LABEL_STAGE: job.stage, LABEL_RUN: job.run_id}, **docker_run_kwargs(job.resources))
        tail = _Tail(job.stage, log)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(container, lines), daemon=True).start()
        deadline = None if job.timeout_seconds is None else time.monotonic() + job.timeout_seconds
        timed_out = False
        try:
            while True:
                try:
                    line = lines.get(timeout=0.5)
                    if line is not None:
                        tail(line)
                except queue.Empty:
                    pass
                check_stop()
                container.reload()
                if container.status in ("exited", "dead"):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    container.stop(timeout=int(job.grace_seconds))
                    break
            container.reload()
            state = container.attrs["State"]
            oom = None
            if state.get("OOMKilled"):
                oom = (f"OOM-killed: the container went over its memory limit "
                       f"(flow.{job.stage}.resources.memory = {job.resources.memory})")
            time.sleep(0.3)  # the log pump's last lines
            while not lines.empty():
                line = lines.get_nowait()
                if line is not None:
                    tail(line)
            return _finish(state.get("ExitCode"), timed_out, job.timeout_seconds, tail, oom)
        except BaseException:  # interrupt: stop the container before the interrupt propagates
            container.stop(timeout=int(job.grace_seconds))
            raise
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)

    @staticmethod
    def _pump(container, lines: queue.Queue) -> None:
        buf = b""
        try:
            for chunk in container.logs(stream=True, follow=True):
                buf += chunk
                *done, buf = buf.split(b"\n")
                for raw in done:
                    lines.put(raw.decode(errors="replace"))
        except Exception:
            pass
        finally:
            if buf:
                lines.put(buf.decode(errors="replace"))
            lines.put(None)


class DeploymentLauncher:
    """Each stage a flow run of the Prefect deployment `<deployment_flow>/<stage>` (`ufo deploy`),
    started from the pipeline's flow run (it shows as its child in the Prefect UI) and run by the
    work pool's worker: a process, a Docker container, a Kubernetes Job."""

    name = "deployment"

    def __init__(self, flow: FlowConfig, tracking_uri: str):
        if not tracking_uri.startswith(("http://", "https://")):
            raise ConfigError(
                f"flow.launcher: deployment runs stages under a worker, which cannot reach the tracking "
                f"store {tracking_uri}; set MLFLOW_TRACKING_URI to an MLflow server (`ufo stack up`)")
        self.flow, self.tracking_uri = flow, tracking_uri

    def _job_variables(self, client, job: StageJob, deployment) -> dict[str, Any]:
        """The pool type's resource variables, plus the environment the stage needs wherever it runs."""
        pool_type = client.read_work_pool(deployment.work_pool_name).type
        resources = {"docker": docker_job_variables, "kubernetes": kubernetes_job_variables}.get(pool_type)
        variables = resources(job.resources) if resources else {}
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        env |= {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        return variables | {"env": {**(deployment.job_variables or {}).get("env", {}), **env}}

    def launch(self, job: StageJob, log: Log) -> LaunchResult:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.states import Cancelling

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
            deadline = None if job.timeout_seconds is None else time.monotonic() + job.timeout_seconds
            try:
                while True:
                    for _ in range(5):
                        time.sleep(0.2)
                        check_stop()
                    flow_run = client.read_flow_run(flow_run.id)
                    if flow_run.state and flow_run.state.is_final():
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
                        self._await_final(client, flow_run.id, job.grace_seconds + 30)
                        return LaunchResult(None, f"timed out after {job.timeout_seconds:g} s and was "
                                                  "cancelled", self._tail(client, flow_run.id))
            except BaseException:
                client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
                raise
            state = flow_run.state
            if state.is_completed():
                return LaunchResult(0)
            return LaunchResult(1, f"flow run {flow_run.name} ended {state.name}", self._tail(client, flow_run.id))

    @staticmethod
    def _await_final(client, flow_run_id, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            fr = client.read_flow_run(flow_run_id)
            if fr.state and fr.state.is_final():
                return
            time.sleep(1.0)

    @staticmethod
    def _tail(client, flow_run_id) -> list[str]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        try:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            # The stage's own lines ([stage] ...), each cut short: the full log is in Prefect.
            lines = [line for entry in logs for line in entry.message.splitlines() if line.startswith("[")]
            return [line[:300] for line in lines[-20:]]
        except Exception:
            return []


def make_launcher(flow: FlowConfig, tracking_uri: str) -> Launcher:
    if flow.launcher == "docker":
        return DockerLauncher(flow, tracking_uri)
    if flow.launcher == "deployment":
        return DeploymentLauncher(flow, tracking_uri)
    return LocalLauncher()
