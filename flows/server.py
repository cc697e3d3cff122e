"""The servers a run talks to: preflight checks before anything starts, and the local Prefect server.

Without `PREFECT_API_URL`, `ufo run` starts its own Prefect API server (SQLite in the workspace) in a
session of its own, so that a Ctrl-C reaches `ufo` first and the server can record the runs' final
states before `ufo` stops it, last. It dies with `ufo` if `ufo` is killed outright.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from stages.common.config import ConfigError
from stages.common.processes import free_port, spawn
from stages.common.runtime import check_stop
from stages.common.workspace import workspace

PREFLIGHT_TIMEOUT_SECONDS = 5.0
SERVER_START_TIMEOUT_SECONDS = 180.0  # a first start migrates a new database: ~13 s, more on a busy machine


class PreflightError(ConfigError):
    """A server the run needs does not answer, or refuses the credentials; raised before anything is
    created (exit 2). `status`: the HTTP status it answered, if it answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def check_http(url: str, what: str, timeout: float = PREFLIGHT_TIMEOUT_SECONDS, shown: str | None = None,
               headers: dict[str, str] | None = None) -> None:
    """GET `url`; a PreflightError naming `what` and `shown` (the URL the user set; default `url`) unless it
    answers 2xx within `timeout`."""
    shown = shown or url
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 -- http(s) URLs of the user's own servers
            if resp.status >= 300:
                raise PreflightError(f"{what} {shown} answered HTTP {resp.status} to {url}", resp.status)
    except urllib.error.HTTPError as err:
        raise PreflightError(f"{what} {shown} answered HTTP {err.code} to {url}", err.code) from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise PreflightError(f"{what} {shown} is unreachable ({reason}); is the server running?") from None


def is_server(uri: str) -> bool:
    """An MLflow server (http/https), not a local store (a SQLite file, a folder)."""
    return uri.startswith(("http://", "https://"))


#: Where each launcher runs stages, for the refusal of a local tracking store.
_RUNS_STAGES = {"docker": "in containers", "deployment": "under a worker"}


def require_tracking_server(uri: str, launcher: str) -> None:
    """A ConfigError unless `launcher`'s stages can reach the tracking store `uri`: stages that run
    elsewhere (in containers, under a worker) reach MLflow only through a server that serves artifacts."""
    if launcher != "local" and not is_server(uri):
        raise ConfigError(f"flow.launcher: {launcher} runs stages {_RUNS_STAGES[launcher]}, which cannot reach the "
                          f"tracking store {uri}; set MLFLOW_TRACKING_URI to an MLflow server that serves artifacts "
                          "(`ufo stack up` starts one, then `source .ufo/stack/env.sh`)")


def _basic(user_pass: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def _credentials_hint() -> str:
    return f"for the servers of `ufo stack up`: source {workspace() / 'stack' / 'env.sh'}"


def check_tracking(uri: str) -> None:
    """The MLflow tracking server answers and accepts this process's credentials (MLFLOW_TRACKING_USERNAME
    and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, as MLflow's client sends them), or a one-line
    PreflightError (local stores need no check)."""
    if not is_server(uri):
        return
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = (_basic(f"{user}:{password}") if user and password else
               {"Authorization": f"Bearer {token}"} if token else {})
    try:
        # A real API call, not /health: it also meets the server's host check and authentication.
        check_http(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1", "MLFLOW_TRACKING_URI",
                   shown=uri, headers=headers)
    except PreflightError as err:
        if err.status == 401 and not headers:
            raise PreflightError(f"the tracking server {uri} asks for credentials (HTTP 401) and none are set: set "
                                 f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD ({_credentials_hint()})",
                                 401) from None
        if err.status in (401, 403):
            who = f"user {user}" if user and password else "MLFLOW_TRACKING_TOKEN"
            why = "wrong password or no such user" if err.status == 401 else "no permission to read experiments"
            raise PreflightError(f"the tracking server {uri} refused the credentials of {who} (HTTP {err.status}: "
                                 f"{why}); set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
                                 f"({_credentials_hint()})", err.status) from None
        raise


def check_prefect_api(url: str) -> None:
    """The Prefect server answers and accepts PREFECT_API_AUTH_STRING (or PREFECT_API_KEY), or a one-line
    PreflightError. Its health check needs no credentials, so an API call checks them."""
    check_http(url.rstrip("/") + "/health", "PREFECT_API_URL", shown=url)
    auth, key = os.environ.get("PREFECT_API_AUTH_STRING"), os.environ.get("PREFECT_API_KEY")
    headers = _basic(auth) if auth else {"Authorization": f"Bearer {key}"} if key else {}
    try:
        check_http(url.rstrip("/") + "/admin/version", "PREFECT_API_URL", shown=url, headers=headers)
    except PreflightError as err:
        if err.status in (401, 403):
            state = "is wrong" if auth else "is not set"
            raise PreflightError(f"the Prefect server {url} refused the request (HTTP {err.status}): "
                                 f"PREFECT_API_AUTH_STRING {state}; set it ({_credentials_hint()})",
                                 err.status) from None
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prefect_executable() -> str:
    local = Path(sys.executable).with_name("prefect")
    return str(local) if local.exists() else (shutil.which("prefect") or "prefect")


@contextlib.contextmanager
def prefect_api(home: Path) -> Iterator[str]:
    """Yield a Prefect API URL: `PREFECT_API_URL` when set (checked), else a server started here.

    Two `ufo run`s in one fresh workspace would both migrate the new database at once; a file lock
    makes the second wait until the first server is up, then start its own on the migrated database.
    """
    if url := os.environ.get("PREFECT_API_URL"):
        check_prefect_api(url)
        yield url
        return
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", "DO_NOT_TRACK": "1"}
    proc = None
    log_path = home / "server.log"
    try:
        with file_lock(home / ".server-start.lock"), open(log_path, "a") as log:
            port = free_port()
            url = f"http://127.0.0.1:{port}/api"
            proc = spawn([prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                          "--no-scheduler", "--no-late-runs", "--no-ui"], env=env, output=log)
            _await_server(proc, url, log_path)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        if proc is not None:
            drain_prefect_clients()
            proc.stop(grace_seconds=5.0)
        os.environ.pop("PREFECT_API_URL", None)


def drain_prefect_clients(timeout: float = 5.0) -> None:
    """Send the logs and events this process still holds to the server before it stops; otherwise
    Prefect's exit handlers retry against a stopped server (and the last task states are lost)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # never let a flush failure hide the run's own outcome
            worker.drain_all(timeout=timeout)


def _await_server(proc, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        check_stop()
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} while starting; "
                               f"its log ({log_path}) ends:\n{tail}")
        try:
            check_http(url + "/health", "Prefect server", timeout=1.0)
            return
        except PreflightError:
            time.sleep(0.2)
    raise RuntimeError(f"the Prefect server did not answer within {SERVER_START_TIMEOUT_SECONDS:g} s "
                       f"(log: {log_path})")
