"""The servers a team runs, on one machine: `ufo stack up | down | status | restart`.

    ufo stack up [--pool NAME --pool-type docker|process] [--mlflow-port 5000] [--prefect-port 4200]
                 [--listen 127.0.0.1 | docker | ADDRESS]
    ufo stack down
    ufo stack status
    ufo stack restart postgres|mlflow|prefect|worker

`up` starts, each in its own session and writing its log under the stack folder
(`$UFO_HOME/stack`, default `.ufo/stack`):
  - PostgreSQL 15 from the system's packages (`initdb`, `pg_ctl`; run as the `postgres` user when
    started by root), holding two databases: `mlflow` and `prefect`;
  - an MLflow tracking server on it that serves artifacts (`mlflow-artifacts:` URIs, files under
    `stack/artifacts`), so stages in containers or on other machines need no shared folder;
  - a Prefect server on it, with its scheduler (deployments' schedules fire);
  - optionally a work pool (base job template from `infra/work-pools/<type>.json`) and a worker.
The MLflow and Prefect servers listen on one address, `--listen`: 127.0.0.1 by default (this machine
only); `docker` is the gateway of Docker's default bridge network, which this machine and containers on
any Docker network reach (a stage on several nodes runs on a network of its own), and nothing outside
this machine does. PostgreSQL listens on 127.0.0.1 only.
Every server asks for credentials (flows/credentials.py: PostgreSQL passwords, MLflow's basic-auth app,
Prefect's API auth string), generated at the first `up` into `stack/credentials.json` (0600) and reused.
It writes `stack/env.sh` (0600; `source` it: the servers' URLs and the pipeline user's credentials) and
`stack/stack.json` (what runs where, and what `up` was asked for; no secrets). Run again while some servers
run and others died, `up` starts only those that are down. `restart SERVER` stops one server, all of its
processes, and starts it again exactly as `up` did. `down` stops all of it, workers first and PostgreSQL
last, and leaves nothing running; it is safe to call twice. After MLflow (re)starts, the runs an earlier
`ufo` could not close while it was down are closed (flows/runs.py: `close_journaled`). A production
deployment runs the same servers under systemd or Kubernetes (see infra/README.md); this is the same stack
for one machine and for the tests.

Each daemon leads a session of its own, and a server is stopped as that whole process group, never by its
leader's pid alone: a leader that died (by SIGKILL, say) leaves its workers serving (MLflow's uvicorn
workers keep its port), and only the group reaches them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flows.credentials import (
    MLFLOW_AUTH_INI,
    StackCredentials,
    credentials_path,
    ensure_mlflow_user,
    env_script,
    load_or_create,
    secrets_text,
    write_private,
)
from flows.postgres import pg_home, postgres_pid, run_checked, start_postgres, stop_postgres
from flows.server import PreflightError, check_http, file_lock, prefect_executable
from stages.common.config import ConfigError
from stages.common.processes import alive, group_members, spawn, start_time, stop
from stages.common.runtime import SECRETS_FILE_IN_CONTAINER
from stages.common.workspace import unclosed_runs_journal, workspace

INFRA = Path(__file__).resolve().parents[1] / "infra"
#: What `restart` takes: `worker` is the work pool's worker (`worker-<pool>` in stack.json and `status`).
RESTARTABLE = ("postgres", "mlflow", "prefect", "worker")
#: Seconds a server gets to exit after SIGTERM before its group gets SIGKILL.
STOP_GRACE_SECONDS = 10.0


def stack_dir() -> Path:
    return workspace() / "stack"


@dataclass(frozen=True)
class Layout:
    """What `up` was asked for: where the servers listen and which work pool the worker serves. Kept in
    stack.json (no secrets: those stay in credentials.json), so that `restart` and a later `up` start each
    server with the very command line and environment the first `up` gave it."""

    host: str
    mlflow_port: int
    prefect_port: int
    postgres_port: int
    pool: str | None = None
    pool_type: str = "docker"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def worker(self) -> str | None:
        return f"worker-{self.pool}" if self.pool else None

    @property
    def servers(self) -> list[str]:
        """In the order they start, each after those it needs; `down` stops them in reverse."""
        return ["postgres", "mlflow", "prefect", *([self.worker] if self.pool else [])]

    def where(self, server: str) -> str:
        """Where `server` answers, for people: a URL, a port, a work pool."""
        return {"postgres": f"127.0.0.1:{self.postgres_port}", "mlflow": self.mlflow_url,
                "prefect": self.prefect_url}.get(server, f"pool {self.pool} ({self.pool_type})")

    def differences(self, asked: Layout) -> list[str]:
        """`--flag running (asked: other)` for each setting in which `asked` differs from this one."""
        flags = {"host": "--listen", "mlflow_port": "--mlflow-port", "prefect_port": "--prefect-port",
                 "postgres_port": "--postgres-port", "pool": "--pool", "pool_type": "--pool-type"}
        mine, theirs = asdict(self), asdict(asked)
        if not (self.pool or asked.pool):
            del flags["pool_type"]  # no pool: its type means nothing
        return [f"{flags[k]} {mine[k]} (asked: {theirs[k]})" for k in flags if mine[k] != theirs[k]]


@dataclass(frozen=True)
class ServerStatus:
    server: str
    state: str
    """`running`, `stopped`, or `leader dead, N processes left` (its orphans still run)."""
    pid: int | None
    """The leader's pid, which is also its process group's id; None when stopped."""
    where: str


@dataclass
class Report:
    """What `up` or `restart` did, for `main` to print."""

    layout: Layout
    started: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    """Servers that were running already and were left alone."""
    before: dict[str, ServerStatus] = field(default_factory=dict)
    """Each started server as it was before: stopped, or what of it was left (and was stopped first)."""
    pids: dict[str, int | None] = field(default_factory=dict)
    closed_runs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# stack.json


def _state_path(root: Path) -> Path:
    return root / "stack.json"


def _load_state(root: Path) -> dict:
    """{"layout": Layout's fields, "processes": {daemon: pid}, "start_times": {daemon: when its leader started}};
    a daemon is missing from both until it has been started."""
    path = _state_path(root)
    state = json.loads(path.read_text()) if path.is_file() else {}
    return {"processes": {}, "start_times": {}, **state}


def _save_state(root: Path, state: dict) -> None:
    tmp = _state_path(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(_state_path(root))


def _recorded_layout(state: dict, root: Path) -> Layout:
    if "layout" not in state:
        raise ConfigError(f"no stack was brought up in {root} (or an older `ufo` did, which kept no ports): "
                          "`ufo stack up` starts one")
    return Layout(**state["layout"])


# ---------------------------------------------------------------------------------------------------
# The daemons: MLflow, Prefect, the worker


def listen_address(listen: str) -> str:
    """`--listen`: an IP address as given, or `docker`: the gateway of Docker's default bridge network."""
    if listen != "docker":
        return listen
    from flows.images import docker_client

    config = docker_client().networks.get("bridge").attrs["IPAM"]["Config"]
    gateway = next((c["Gateway"] for c in config if c.get("Gateway")), None)
    if gateway is None:
        raise ConfigError("--listen docker: Docker's bridge network has no gateway address; give one with --listen")
    return gateway


def client_env(layout: Layout, creds: StackCredentials) -> dict[str, str]:
    """What `source stack/env.sh` exports: the servers' URLs and the pipeline user's credentials."""
    return {"MLFLOW_TRACKING_URI": layout.mlflow_url, "PREFECT_API_URL": layout.prefect_url, **creds.client_env()}


def _daemon(root: Path, layout: Layout, creds: StackCredentials, name: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of daemon `name` (mlflow, prefect or the worker): the one place
    they are built, so that `up` and `restart` start a server alike. The environment is this process's,
    minus any client settings it carries, plus the stack's (passwords from the credentials file)."""
    base_env = {**os.environ, "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", *creds.client_env()):
        base_env.pop(key, None)
    server_env = {**base_env, "PGPASSWORD": creds.pg_password}
    pg, host = f"{creds.pg_user}@127.0.0.1:{layout.postgres_port}", layout.host
    if name == "mlflow":
        port = layout.mlflow_port
        return [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
                "--backend-store-uri", f"postgresql+psycopg://{pg}/mlflow",
                "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
                "--host", host, "--port", str(port), "--workers", "2",
                "--allowed-hosts", f"{host}:{port},localhost:{port},{host},localhost"], {
            **server_env, "MLFLOW_AUTH_CONFIG_PATH": str(root / "mlflow-auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": creds.mlflow_admin, "MLFLOW_AUTH_ADMIN_PASSWORD": creds.mlflow_admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.mlflow_flask_secret_key}
    if name == "prefect":
        return [prefect_executable(), "server", "start", "--host", host, "--port", str(layout.prefect_port)], {
            **server_env, "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/prefect",
            "PREFECT_SERVER_API_AUTH_STRING": creds.prefect_auth_string,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": layout.prefect_url}
    # The worker, and the flow runs a process worker starts, log in with the pipeline's credentials.
    return [prefect_executable(), "worker", "start", "--pool", layout.pool, "--type", layout.pool_type,
            "--name", f"ufo-{layout.pool}"], {
        **base_env, **client_env(layout, creds), "PREFECT_HOME": str(root / "prefect")}


def _launch(root: Path, layout: Layout, creds: StackCredentials, name: str) -> int:
    """Start daemon `name` in a session of its own that outlives this process; its pid (and process group)."""
    cmd, env = _daemon(root, layout, creds, name)
    if name == "mlflow":
        (root / "artifacts").mkdir(exist_ok=True)
        write_private(root / "mlflow-auth.ini", MLFLOW_AUTH_INI.format(
            database_uri=f"postgresql+psycopg://{creds.pg_user}@127.0.0.1:{layout.postgres_port}/mlflow_auth",
            admin=creds.mlflow_admin))
    elif name == layout.worker:
        create_pool(layout.pool, layout.pool_type, env, pool_secrets_file(root, creds))
    with open(root / f"{name}.log", "a") as log:  # the daemon holds its own copy of the descriptor
        return spawn(cmd, env=env, cwd=root, output=log, with_parent=False).pid


def _ready(root: Path, layout: Layout, creds: StackCredentials, name: str, pid: int,
           heartbeat_before: str | None = None) -> None:
    """Wait until daemon `name` serves: MLflow's and Prefect's health checks answer (then MLflow gets its
    pipeline user), a worker has reported to Prefect since `heartbeat_before`."""
    log = root / f"{name}.log"
    if name == "mlflow":
        _await("MLflow server", lambda: _answers(f"{layout.mlflow_url}/health"), pid, log,
               f"no answer at {layout.mlflow_url}/health")
        ensure_mlflow_user(layout.mlflow_url, creds, credentials_path(root))
    elif name == "prefect":
        _await("Prefect server", lambda: _answers(f"{layout.prefect_url}/health"), pid, log,
               f"no answer at {layout.prefect_url}/health")
    else:
        _await(f"the worker of pool {layout.pool}",
               lambda: _worker_heartbeat(layout, creds) not in (None, heartbeat_before), pid, log,
               f"no heartbeat at {layout.prefect_url}")


def _answers(url: str) -> bool:
    try:
        check_http(url, url, timeout=2)
    except PreflightError:
        return False
    return True


def _await(what: str, ready: Callable[[], bool], pid: int, log: Path, waiting_for: str, timeout: float = 180) -> None:
    """Poll `ready()` until it holds; an error with the log's tail if the daemon `pid` exits first, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive(pid):
            raise RuntimeError(f"{what} exited while starting; its log {log} ends:\n"
                               f"{log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:g} s ({waiting_for}; log: {log})")
        time.sleep(0.5)


def _worker_heartbeat(layout: Layout, creds: StackCredentials) -> str | None:
    """When the stack's worker last reported to the Prefect server (the server's time stamp); None if it
    never did, or the server does not say. A worker reports as soon as it has started polling its pool."""
    token = base64.b64encode(creds.prefect_auth_string.encode()).decode()
    req = urllib.request.Request(f"{layout.prefect_url}/work_pools/{layout.pool}/workers/filter", data=b"{}",
                                 method="POST", headers={"Authorization": f"Basic {token}",
                                                         "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 -- the stack's own server
            workers = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return next((w.get("last_heartbeat_time") for w in workers if w.get("name") == f"ufo-{layout.pool}"), None)


def pool_secrets_file(root: Path, creds: StackCredentials) -> Path:
    """The pipeline user's MLflow credentials as a file for the work pool's containers to mount (0444 in a
    0700 folder: the stage images' user reads it through the mount, other users here cannot reach it)."""
    folder = root / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "mlflow"
    write_private(path, secrets_text({k: v for k, v in creds.client_env().items() if k.startswith("MLFLOW_")}),
                  mode=0o444)
    return path


def create_pool(pool: str, pool_type: str, env: dict[str, str], secrets_file: Path | None = None) -> None:
    """Create (or update) the work pool with the project's base job template for its type.

    A Docker pool's containers mount `secrets_file` read-only where stages look for it
    (`stages.common.runtime.SECRETS_FILE_IN_CONTAINER`): the MLflow credentials stay out of the job
    variables, which Prefect stores and shows, and out of the containers' environment. (Prefect's worker
    does put its own settings, PREFECT_API_AUTH_STRING included, into each container's environment.)
    """
    template = INFRA / "work-pools" / f"{pool_type}.json"
    exists = subprocess.run([prefect_executable(), "work-pool", "inspect", pool], env=env, capture_output=True).returncode == 0
    cmd = ["work-pool", "update", pool] if exists else ["work-pool", "create", pool, "--type", pool_type]
    if template.is_file():
        if pool_type == "docker" and secrets_file is not None:
            data = json.loads(template.read_text())
            data["variables"]["properties"]["volumes"]["default"] = [
                f"{secrets_file}:{SECRETS_FILE_IN_CONTAINER}:ro"]
            template = stack_dir() / f"work-pool-{pool_type}.json"
            template.write_text(json.dumps(data, indent=2))
        cmd += ["--base-job-template", str(template)]
    run_checked([prefect_executable(), *cmd], f"prefect work-pool {'update' if exists else 'create'} {pool}", env)


# ---------------------------------------------------------------------------------------------------
# Process groups: what is left of a server, and stopping all of it


def _left(state: dict, name: str) -> list[int]:
    """The live processes of a daemon's process group (the session `spawn` made it lead), leader or not.

    Linux hands a group's id to no new process while any member lives, so members found with it are the
    daemon's own, even after its leader died. Once the whole group has exited, the leader's pid may go to
    an unrelated process, and a new session it starts gets that id: a leader with another start time than
    the one recorded is such a stranger, never to be stopped.
    """
    pid, started = state["processes"].get(name), state["start_times"].get(name)
    if pid is None:
        return []
    members = group_members(pid)
    if pid in members and started is not None and start_time(pid) != started:
        return []
    return members


def _stop_server(root: Path, state: dict, name: str) -> bool:
    """Stop every process left of server `name`; whether there was any."""
    if name == "postgres":
        if postgres_pid(root) is None:
            return False
        stop_postgres(root)  # its backends exit with the postmaster
        if (pid := postgres_pid(root)) is not None:
            raise RuntimeError(f"`pg_ctl stop` left PostgreSQL running (pid {pid}); see {pg_home(root)}/postgres.log")
        return True
    if left := _left(state, name):
        # The group, not the leader: when the leader died its workers still serve (and hold the port).
        pid = state["processes"][name]
        stop(pid, grace_seconds=STOP_GRACE_SECONDS)
        if survivors := _left(state, name):
            raise RuntimeError(f"{name}: processes {survivors} of group {pid} outlived SIGKILL")
    return bool(left)


# ---------------------------------------------------------------------------------------------------
# up, restart, down, status


def _start(root: Path, state: dict, layout: Layout, creds: StackCredentials, names: list[str], report: Report) -> None:
    """Start servers `names` (of `layout.servers`, in that order), each after stopping what is left of its
    earlier start, recording each in stack.json as it starts, and wait until each serves. If one fails,
    those started here are stopped again (`down` would reach them too) and the error propagates."""
    started = []

    def record(name: str, pid: int) -> int:
        state["processes"][name], state["start_times"][name] = pid, start_time(pid)
        _save_state(root, state)
        started.append(name)
        return pid

    try:
        for name in names:
            report.before[name] = _status_of(root, state, layout, name)
            _stop_server(root, state, name)
        if "postgres" in names:
            start_postgres(root, layout.postgres_port, creds)
            started.append("postgres")
        # MLflow and Prefect start side by side: each spends most of its start migrating its database.
        launched = {name: record(name, _launch(root, layout, creds, name))
                    for name in ("mlflow", "prefect") if name in names}
        for name, pid in launched.items():
            _ready(root, layout, creds, name, pid)
        if layout.worker in names:
            before = _worker_heartbeat(layout, creds)
            pid = record(layout.worker, _launch(root, layout, creds, layout.worker))
            _ready(root, layout, creds, layout.worker, pid, heartbeat_before=before)
        write_private(root / "env.sh", env_script(client_env(layout, creds)))
    except BaseException:
        for name in reversed(started):
            with contextlib.suppress(Exception):  # the error that stopped the start is the one to report
                _stop_server(root, state, name)
        raise
    report.started += started
    report.pids |= {name: state["processes"].get(name) or postgres_pid(root) for name in started}


def up(layout: Layout) -> Report:
    """Start the stack's servers that are not running (all of them the first time); leave running ones be.

    A server whose leader died is started again, after what is left of it is stopped. While any server
    runs, `layout` must be the one it was started with: servers on two layouts would not find each other.
    """
    root = stack_dir()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # artifacts, logs and credentials: the servers' business, not other users' of this machine
    with file_lock(root / "stack.lock"):  # two `up`s at once would start every server twice
        state = _load_state(root)
        creds, _created = load_or_create(root)
        running = [name for name in dict.fromkeys(["postgres", *state["processes"]])
                   if _status_of(root, state, None, name).state == "running"]
        if running:
            if "layout" not in state:
                raise ConfigError(f"the stack in {root} was started by an older `ufo`, which kept no ports "
                                  f"({', '.join(running)} run): `ufo stack down`, then `ufo stack up`")
            if differences := Layout(**state["layout"]).differences(layout):
                raise ConfigError(f"the stack in {root} runs ({', '.join(running)}) with other settings: "
                                  f"{'; '.join(differences)}; give the same ones to start what is down, or "
                                  "`ufo stack down` first to change them")
        else:
            for name in [n for n in state["processes"] if n not in layout.servers]:  # a worker of another pool
                _stop_server(root, state, name)
                del state["processes"][name]
                state["start_times"].pop(name, None)
        state |= {"root": str(root), "layout": asdict(layout)}
        _save_state(root, state)
        report = Report(layout, running=running)
        _start(root, state, layout, creds, [name for name in layout.servers if name not in running], report)
    report.closed_runs = close_journaled_runs(layout, creds)
    return report


def restart(server: str) -> Report:
    """Stop server `server` (postgres, mlflow, prefect or worker), every process of it that is left, and
    start it again as `up` did: same command line, environment, ports and address."""
    root = stack_dir()
    _recorded_layout(_load_state(root), root)  # never brought up: say so, and make no lock file
    with file_lock(root / "stack.lock"):
        state = _load_state(root)
        layout = _recorded_layout(state, root)
        if server not in RESTARTABLE and server != layout.worker:
            raise ConfigError(f"no server {server!r} in the stack: restart one of {', '.join(RESTARTABLE)} "
                              "(worker: the work pool's worker)")
        name = layout.worker if server == "worker" else server
        if name is None:
            raise ConfigError(f"the stack in {root} has no worker: it was brought up without --pool")
        needed = "prefect" if name == layout.worker else None if name == "postgres" else "postgres"
        if needed and _status_of(root, state, layout, needed).state != "running":
            raise ConfigError(f"{name} needs {needed}, which is not running: `ufo stack up` starts every server "
                              "that is down")
        if not credentials_path(root).is_file():
            raise ConfigError(f"{credentials_path(root)} is missing; the stack's databases only take the passwords "
                              "in it: restore it, or remove the stack folder to start afresh")
        creds, _created = load_or_create(root)
        report = Report(layout)
        _start(root, state, layout, creds, [name], report)
    if name == "mlflow":
        report.closed_runs = close_journaled_runs(layout, creds)
    return report


def down() -> list[str]:
    """Stop everything the stack started (workers, servers, then PostgreSQL), every process of each server
    even where its leader died; return what was stopped."""
    root = stack_dir()
    if not root.is_dir():
        return []
    with file_lock(root / "stack.lock"):
        state = _load_state(root)
        stopped, errors = [], []
        daemons = sorted(state["processes"], key=lambda n: (not n.startswith("worker"), n != "prefect", n))
        for name in [*daemons, "postgres"]:
            try:
                if _stop_server(root, state, name):
                    stopped.append(name)
            except RuntimeError as err:  # stop the others all the same
                errors.append(str(err))
        state |= {"processes": {}, "start_times": {}}  # the layout stays: `restart` and `status` still know it
        _save_state(root, state)
    if errors:
        raise RuntimeError("; ".join(errors))
    return stopped


def _status_of(root: Path, state: dict, layout: Layout | None, name: str) -> ServerStatus:
    where = layout.where(name) if layout else "-"
    if name == "postgres":
        pid = postgres_pid(root)
        return ServerStatus(name, "running" if pid else "stopped", pid, where)
    pid, left = state["processes"].get(name), _left(state, name)
    if not left:
        return ServerStatus(name, "stopped", None, where)
    if pid in left:
        return ServerStatus(name, "running", pid, where)
    many = "processes" if len(left) != 1 else "process"
    return ServerStatus(name, f"leader dead, {len(left)} {many} left", pid, where)


def status() -> list[ServerStatus]:
    """One row per server of the stack (none if it was never brought up)."""
    root = stack_dir()
    state = _load_state(root)
    layout = Layout(**state["layout"]) if "layout" in state else None
    if layout is None and not state["processes"]:
        return []
    names = dict.fromkeys([*(layout.servers if layout else ["postgres"]), *state["processes"]])
    return [_status_of(root, state, layout, name) for name in names]


@contextlib.contextmanager
def _environ(values: dict[str, str | None]) -> Iterator[None]:
    """os.environ with `values` set (None: unset) for the duration of the context."""
    def put(pairs: dict[str, str | None]) -> None:
        for key, value in pairs.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {key: os.environ.get(key) for key in values}
    put(values)
    try:
        yield
    finally:
        put(saved)


def close_journaled_runs(layout: Layout, creds: StackCredentials) -> list[str]:
    """Close the runs an earlier `ufo` could not close while the stack's MLflow was down (flows/runs.py:
    `close_journaled`), as the pipeline user; one line per closed run."""
    if not unclosed_runs_journal().is_file():
        return []  # the usual case, told without importing MLflow (seconds)
    from mlflow.tracking import MlflowClient

    from flows.runs import close_journaled

    # MLflow's client reads its credentials from the environment only; a token would win over them.
    with _environ({"MLFLOW_TRACKING_USERNAME": creds.mlflow_user, "MLFLOW_TRACKING_PASSWORD": creds.mlflow_password,
                   "MLFLOW_TRACKING_TOKEN": None}):
        return close_journaled(MlflowClient(tracking_uri=layout.mlflow_url))


def _table(rows: list[tuple[str, ...]]) -> str:
    """Rows as columns aligned on their widest cell (the last column ragged)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ufo stack", description="PostgreSQL + MLflow server + Prefect server "
                                "(+ a work pool and its worker) on this machine")
    sub = p.add_subparsers(dest="action", required=True)
    up_p = sub.add_parser("up", help="start the stack, or those of its servers that are down")
    up_p.add_argument("--pool", help="also create this work pool and start a worker for it")
    up_p.add_argument("--pool-type", default="docker", choices=("docker", "process"))
    up_p.add_argument("--mlflow-port", type=int, default=5000)
    up_p.add_argument("--prefect-port", type=int, default=4200)
    up_p.add_argument("--postgres-port", type=int, default=55432)
    up_p.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS",
                      help="where the MLflow and Prefect servers listen: 127.0.0.1 (default: this machine only), "
                           "`docker` (the Docker bridge's gateway: also containers on Docker networks, e.g. a stage "
                           "on several nodes) or an address of this machine")
    sub.add_parser("down", help="stop the stack, leaving nothing running")
    sub.add_parser("status", help="what runs")
    restart_p = sub.add_parser("restart", help="stop one server, all that is left of it, and start it as `up` did")
    restart_p.add_argument("server", metavar="SERVER", help=f"one of {', '.join(RESTARTABLE)} (the pool's worker)")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            report = up(Layout(listen_address(args.listen), args.mlflow_port, args.prefect_port, args.postgres_port,
                               args.pool, args.pool_type))
            if report.started:
                print("started: " + ", ".join(report.started))
            if report.running:
                print(("already running: " if report.started else "all running, nothing to start: ")
                      + ", ".join(report.running))
            for name, was in report.before.items():
                if was.state.startswith("leader dead"):
                    print(f"{name}: its leader (pid {was.pid}) had died; stopped what was left ({was.state})")
        elif args.action == "restart":
            report = restart(args.server)
            for name in report.started:
                was = report.before[name]
                print(f"restarted {name}: pid {report.pids[name]}, {was.where}; before: {was.state}"
                      + (f" (pid {was.pid})" if was.pid else ""))
        elif args.action == "down":
            stopped = down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
            return 0
        else:
            rows = status()
            if not rows:
                print(f"no stack in {stack_dir()} (`ufo stack up` starts one)")
                return 0
            print(_table([("SERVER", "STATE", "PID", "URL"),
                          *((r.server, r.state, str(r.pid or "-"), r.where) for r in rows)]))
            return 0
    except RuntimeError as err:  # a server did not start or stop; what this call started is stopped again
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in report.closed_runs:
        print(f"closed run: {line}")
    if args.action == "up":
        layout = report.layout
        print(f"MLflow:  {layout.mlflow_url}\nPrefect: {layout.prefect_url} (UI: {layout.prefect_url.removesuffix('/api')})")
        if layout.pool:
            print(f"work pool {layout.pool} ({layout.pool_type}) with a worker")
        print(f"Use it:  source {stack_dir() / 'env.sh'}\nStop it: ufo stack down")
    return 0
