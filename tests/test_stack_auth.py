"""`ufo stack up` turns credentials on: a real stack (PostgreSQL, MLflow's basic-auth server, Prefect's
server with an auth string; no work pool, no Docker) in a temporary workspace, asked the way a client
and an intruder would ask it. Its start (~20-40 s, most of it the servers' first migrations) is shared
by the module; `ufo stack down` leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import psycopg
import pytest

from flows.credentials import secrets_file
from flows.launchers import StageJob, deployment_job_variables
from flows.postgres import pg_home
from flows.registry import CHAMPION, _alias
from stages.common.processes import alive, free_port
from stages.common.runtime import SECRETS_FILE_ENV, load_secrets_file
from tests.helpers import Stack, http_status, processes_of


def _up(s: Stack) -> None:
    s.ports = getattr(s, "ports", None) or [str(free_port()) for _ in range(3)]
    up = s.ufo("stack", "up", "--mlflow-port", s.ports[0], "--prefect-port", s.ports[1],
               "--postgres-port", s.ports[2], timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    s.exported = s.load_env()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("auth-stack"))
    try:
        _up(s)
        yield s
    finally:
        down = s.ufo("stack", "down", timeout=300)
        print(down.stdout, down.stderr)
        left = processes_of(s.home)
        pg_left = (pg_home(s.home / "stack") / "pg" / "postmaster.pid").is_file()
        if pg_home(s.home / "stack").is_relative_to("/var/tmp"):  # root: the cluster lives outside the workspace
            shutil.rmtree(pg_home(s.home / "stack"), ignore_errors=True)
        assert down.returncode == 0 and not left and not pg_left, (down.stdout + down.stderr, left)


def test_credentials_are_generated_private_and_exported(stack):
    folder = stack.home / "stack"
    for name in ("credentials.json", "env.sh", "mlflow-auth.ini"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert set(stack.exported) == {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME",
                                   "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"}
    assert stack.exported["MLFLOW_TRACKING_USERNAME"] == "ufo-pipeline"
    assert len(stack.exported["MLFLOW_TRACKING_PASSWORD"]) >= 40
    # No password on the servers' command lines (`ps` shows those to every user of the machine).
    secrets = [stack.exported["MLFLOW_TRACKING_PASSWORD"], stack.exported["PREFECT_API_AUTH_STRING"]]
    assert not [cmd for _, cmd in processes_of(stack.home) if any(x in cmd for x in secrets)]


def test_mlflow_asks_for_the_pipeline_users_password(stack):
    url = stack.exported["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = stack.exported["MLFLOW_TRACKING_USERNAME"], stack.exported["MLFLOW_TRACKING_PASSWORD"]
    assert http_status(url) == 401
    assert http_status(url, f"{user}:wrong-password") == 401
    assert http_status(url, f"{user}:{password}") == 200
    # The pipeline user is no admin: it may not see other users.
    admin = stack.exported["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/users/get?username=admin"
    assert http_status(admin, f"{user}:{password}") == 403


def test_the_pipeline_user_may_do_what_a_pipeline_does(stack, monkeypatch, tmp_path):
    """default_permission READ is enough: the creator of an experiment or a registered model MANAGEs it."""
    import mlflow

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, stack.exported[key])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = mlflow.MlflowClient(tracking_uri=stack.exported["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment("auth-check")
    run = client.create_run(exp, tags={"ufo.kind": "check"})
    client.log_metric(run.info.run_id, "loss", 0.5)
    (tmp_path / "a.txt").write_text("artifact")
    client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))  # through the server's artifact proxy
    client.set_terminated(run.info.run_id)
    # A first pipeline asks for the champion of a model nobody has registered yet (the auth app answers 403
    # there, not 404): no champion, not a failure.
    assert _alias(client, "auth-check-model", CHAMPION) is None
    client.create_registered_model("auth-check-model")
    version = client.create_model_version("auth-check-model", f"runs:/{run.info.run_id}/a.txt", run_id=run.info.run_id)
    client.set_registered_model_alias("auth-check-model", "candidate", str(version.version))  # the registry gate
    assert client.get_model_version_by_alias("auth-check-model", "candidate").version == version.version
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["a.txt"]
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}


def test_prefect_asks_for_the_auth_string(stack):
    api = stack.exported["PREFECT_API_URL"]
    assert http_status(f"{api}/health") == 200  # probes stay open
    assert http_status(f"{api}/admin/version") == 401
    assert http_status(f"{api}/admin/version", "ufo:wrong") == 401
    assert http_status(f"{api}/admin/version", stack.exported["PREFECT_API_AUTH_STRING"]) == 200


def test_postgres_refuses_ufo_without_its_password_and_ufo_is_no_superuser(stack):
    port = int(stack.ports[2])
    socket_dir = str(pg_home(stack.home / "stack") / "socket")
    for host in ("127.0.0.1", socket_dir):  # TCP and the Unix socket alike
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=host, port=port, user="ufo", dbname="mlflow", password="", connect_timeout=10)
    creds = json.loads((stack.home / "stack" / "credentials.json").read_text())
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=port, user="ufo", dbname="mlflow", password="wrong", connect_timeout=10)
    with psycopg.connect(host="127.0.0.1", port=port, user="ufo", dbname="mlflow", password=creds["pg_password"],
                         connect_timeout=10) as conn:
        assert conn.execute("select rolsuper, rolcreaterole, rolcreatedb from pg_roles where rolname = 'ufo'"
                            ).fetchone() == (False, False, False)


def _ufo_run(stack: Stack, **env: str):
    t0 = time.monotonic()
    proc = stack.ufo("run", "configs/tiny.yaml", timeout=120, **{**stack.exported, **env})
    return proc, time.monotonic() - t0


def test_ufo_run_refuses_wrong_or_missing_credentials_in_seconds(stack):
    proc, wall = _ufo_run(stack, MLFLOW_TRACKING_PASSWORD="wrong-password")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused the credentials of user ufo-pipeline (HTTP 401" in proc.stderr
    assert "source " in proc.stderr and "env.sh" in proc.stderr
    print(f"wrong MLflow password: exit 2 after {wall:.1f} s")
    proc, _ = _ufo_run(stack, MLFLOW_TRACKING_USERNAME="", MLFLOW_TRACKING_PASSWORD="")
    assert proc.returncode == 2 and "asks for credentials (HTTP 401) and none are set" in proc.stderr, proc.stderr
    proc, wall = _ufo_run(stack, PREFECT_API_AUTH_STRING="ufo:wrong")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused the request (HTTP 401): PREFECT_API_AUTH_STRING is wrong" in proc.stderr
    print(f"wrong Prefect auth string: exit 2 after {wall:.1f} s")
    # Nothing was created: the pipeline user sees no experiment.
    import mlflow

    search = mlflow.MlflowClient(tracking_uri=stack.exported["MLFLOW_TRACKING_URI"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", stack.exported["MLFLOW_TRACKING_USERNAME"])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", stack.exported["MLFLOW_TRACKING_PASSWORD"])
        names = [e.name for e in search.search_experiments()]
    assert not [n for n in names if n.startswith("ufo-tiny")], names


def test_a_restart_reuses_the_credentials(stack):
    before = (stack.home / "stack" / "credentials.json").read_text()
    pids = [pid for pid, _ in processes_of(stack.home)]
    down = stack.ufo("stack", "down", timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [pid for pid in pids if alive(pid)]
    _up(stack)
    assert (stack.home / "stack" / "credentials.json").read_text() == before
    url = stack.exported["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = stack.exported["MLFLOW_TRACKING_USERNAME"], stack.exported["MLFLOW_TRACKING_PASSWORD"]
    assert http_status(url, f"{user}:{password}") == 200


def test_a_mounted_secrets_file_reaches_the_stage_environment(tmp_path, monkeypatch):
    """The Docker launcher's side (a private file, gone afterwards) and the stage's (read, never overriding)."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "already-set")
    with secrets_file(tmp_path / "secrets", {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"}) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o444 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        monkeypatch.setenv(SECRETS_FILE_ENV, str(path))
        assert load_secrets_file() == ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]
    assert not path.exists() and not path.parent.exists()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "u"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "already-set"


@pytest.mark.parametrize("pool_type", ["docker", "process", "kubernetes"])
def test_credentials_stay_out_of_a_deployments_job_variables(pool_type, tmp_path, monkeypatch):
    """Prefect stores a flow run's job variables and shows them in its UI: the worker's environment (a
    process pool), the pool's mounted file (Docker) or the pod's Secret (Kubernetes) carry the credentials."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ufo-pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "ufo:s3cret-string")
    job = StageJob(stage="sft", config={}, run_id="run1", parent_run_id="parent1", workdir=tmp_path)
    variables = json.dumps(deployment_job_variables(job, pool_type, "pool", "http://127.0.0.1:5000"))
    assert "s3cret" not in variables and "MLFLOW_TRACKING_PASSWORD" not in variables
