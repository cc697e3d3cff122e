"""The servers a team runs, on one machine: `ufo stack up | down | status`.

    ufo stack up [--pool NAME --pool-type docker|process] [--mlflow-port 5000] [--prefect-port 4200]
                 [--listen 127.0.0.1 | docker | ADDRESS]
    ufo stack down
    ufo stack status

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
`stack/stack.json` (what runs where). `down` stops all of it, workers first and PostgreSQL last, and leaves nothing
running; it is safe to call twice. A production deployment runs the same servers under systemd or
Kubernetes (see infra/README.md); this is the same stack for one machine and for the tests.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flows.credentials import (
    StackCredentials,
    credentials_path,
    env_script,
    load_or_create,
    secrets_text,
    write_private,
)
from flows.server import PreflightError, check_http, prefect_executable
from stages.common.config import ConfigError
from stages.common.processes import alive, spawn, stop
from stages.common.runtime import SECRETS_FILE_IN_CONTAINER
from stages.common.workspace import workspace

INFRA = Path(__file__).resolve().parents[1] / "infra"
PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")
#: The databases the `ufo` role owns: MLflow's runs, Prefect's, and MLflow's users and permissions.
DATABASES = ("mlflow", "prefect", "mlflow_auth")


def stack_dir() -> Path:
    return workspace() / "stack"


def _state_path(root: Path) -> Path:
    return root / "stack.json"


def _load_state(root: Path) -> dict:
    path = _state_path(root)
    return json.loads(path.read_text()) if path.is_file() else {"processes": {}}


def _save_state(root: Path, state: dict) -> None:
    tmp = _state_path(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(_state_path(root))


def _pg_tool(name: str) -> str:
    for folder in PG_BIN_CANDIDATES:
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"PostgreSQL's `{name}` is not installed (apt-get install postgresql)")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: root runs it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")


def pg_home(root: Path) -> Path:
    """Where the cluster lives. Run as root, PostgreSQL runs as `postgres`, which may not be able to
    enter the workspace (e.g. under a 0700 home): then it lives in /var/tmp, one folder per stack,
    with `stack/pg` linking to it."""
    if os.geteuid() != 0:
        return root / "pg-home"
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"ufo-stack-{digest}"


def start_postgres(root: Path, port: int, creds: StackCredentials) -> str:
    """Initialise (once) and start the cluster with password logins only; make (once) the `ufo` role and its
    databases. Return the SQLAlchemy host part `ufo@host:port` (the password goes in PGPASSWORD, which libpq
    and asyncpg read, so that it appears on no command line: `ps` shows those to every user)."""
    home = pg_home(root)
    data, sock = home / "pg", home / "socket"
    for folder in (home, sock):
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
    link = root / "pg"
    if not link.exists():
        link.symlink_to(data)
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        pwfile = home / "initdb-password"
        write_private(pwfile, creds.pg_superuser_password + "\n")
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
            shutil.chown(pwfile, "postgres")
        try:
            # scram-sha-256 for every connection, the Unix socket included: trust (initdb's default) lets any
            # local user connect as any role, the superuser included.
            _run(_as_postgres([_pg_tool("initdb"), "-D", str(data), "-U", creds.pg_superuser,
                               "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"]), "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    elif not _password_auth(data):
        raise ConfigError(f"the stack's PostgreSQL in {data} lets anyone connect without a password (made by an "
                          "older `ufo stack up`); remove that folder and `ufo stack up` again to start a new stack "
                          "with passwords (the runs it tracked are lost), or move it away to keep them")
    log = home / "postgres.log"
    if not log.exists():
        log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres")
    _run(_as_postgres([_pg_tool("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                       f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]), "pg_ctl start")
    _ensure_role_and_databases(port, creds)
    return f"{creds.pg_user}@127.0.0.1:{port}"


def _password_auth(data: Path) -> bool:
    """Whether the cluster's pg_hba.conf asks every connection for a password (no `trust` line)."""
    lines = [line.split() for line in (data / "pg_hba.conf").read_text().splitlines()]
    return not any(fields and not fields[0].startswith("#") and "trust" in fields for fields in lines)


def _ensure_role_and_databases(port: int, creds: StackCredentials) -> None:
    """The `ufo` role (LOGIN, no superuser, no CREATEDB/CREATEROLE) with the credentials file's password, and
    the databases it owns. Idempotent; the password is set on every start so the file stays the truth."""
    import psycopg
    from psycopg import sql

    try:
        conn = psycopg.connect(host="127.0.0.1", port=port, user=creds.pg_superuser,
                               password=creds.pg_superuser_password, dbname="postgres", autocommit=True,
                               connect_timeout=10)
    except psycopg.OperationalError as err:
        raise ConfigError(f"the stack's PostgreSQL refused {creds.pg_superuser} with the password in "
                          f"{credentials_path(stack_dir())} ({str(err).strip()}); the file does not belong to this "
                          "cluster: restore the right one, or remove the stack folder to start afresh") from None
    with conn:
        role = sql.Identifier(creds.pg_user)
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (creds.pg_user,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        # Sent as a literal and hashed by the server (password_encryption = scram-sha-256); statements are
        # not logged (log_statement = none), so the plain password is kept nowhere.
        conn.execute(sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
            sql.SQL(verb), role, sql.Literal(creds.pg_password)))
        for db in DATABASES:
            if not conn.execute("select 1 from pg_database where datname = %s", (db,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), role))


def stop_postgres(root: Path) -> None:
    data = pg_home(root) / "pg"
    if (data / "postmaster.pid").is_file():
        subprocess.run(_as_postgres([_pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)


def _start_daemon(root: Path, name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start a long-lived server in a session of its own that outlives this process (`ufo stack up`)."""
    with open(root / f"{name}.log", "a") as log:  # the daemon holds its own copy of the descriptor
        return spawn(cmd, env=env, cwd=root, output=log, with_parent=False).pid


def _await(url: str, what: str, pid: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            check_http(url, what, timeout=2)
            return
        except PreflightError:
            if not alive(pid):
                raise RuntimeError(f"{what} exited while starting; its log {log} ends:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:g} s (log: {log})")


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


MLFLOW_AUTH_INI = """[mlflow]
# What a user may do with experiments and models that no grant names: read. Whoever creates an
# experiment or a registered model gets MANAGE on it (MLflow's basic-auth app grants it after the
# create call), so the pipeline user edits everything it made, and a team member's user reads it.
default_permission = READ
database_uri = {database_uri}
admin_username = {admin}
# The admin's password is MLFLOW_AUTH_ADMIN_PASSWORD in the server's environment, not in this file.
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def up(pool: str | None, pool_type: str, mlflow_port: int, prefect_port: int, pg_port: int,
       host: str = "127.0.0.1") -> dict:
    root = stack_dir()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # artifacts, logs and credentials: the servers' business, not other users' of this machine
    state = _load_state(root)
    if any(alive(pid) for pid in state["processes"].values()):
        raise ConfigError(f"the stack in {root} is already running (`ufo stack status`; `ufo stack down` stops it)")
    creds, _created = load_or_create(root)
    state = {"processes": {}, "root": str(root)}
    _save_state(root, state)  # `down` can clean up whatever starts below, even if `up` fails half-way
    try:
        pg = start_postgres(root, pg_port, creds)
        state["postgres"] = pg
        base_env = {**os.environ, "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", *creds.client_env()):
            base_env.pop(key, None)
        server_env = {**base_env, "PGPASSWORD": creds.pg_password}
        mlflow_url = f"http://{host}:{mlflow_port}"
        (root / "artifacts").mkdir(exist_ok=True)
        write_private(root / "mlflow-auth.ini", MLFLOW_AUTH_INI.format(
            database_uri=f"postgresql+psycopg://{pg}/mlflow_auth", admin=creds.mlflow_admin))
        mlflow_env = {**server_env, "MLFLOW_AUTH_CONFIG_PATH": str(root / "mlflow-auth.ini"),
                      "MLFLOW_AUTH_ADMIN_USERNAME": creds.mlflow_admin,
                      "MLFLOW_AUTH_ADMIN_PASSWORD": creds.mlflow_admin_password,
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.mlflow_flask_secret_key}
        mlflow_exe = str(Path(sys.executable).with_name("mlflow"))
        pid = _start_daemon(root, "mlflow", [
            mlflow_exe, "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"postgresql+psycopg://{pg}/mlflow",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
            "--host", host, "--port", str(mlflow_port), "--workers", "2",
            "--allowed-hosts", f"{host}:{mlflow_port},localhost:{mlflow_port},{host},localhost"], mlflow_env)
        state["processes"]["mlflow"] = pid
        _save_state(root, state)
        prefect_url = f"http://{host}:{prefect_port}/api"
        prefect_env = {**server_env, "PREFECT_HOME": str(root / "prefect"),
                       "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/prefect",
                       "PREFECT_SERVER_API_AUTH_STRING": creds.prefect_auth_string,
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": prefect_url}
        pid = _start_daemon(root, "prefect", [prefect_executable(), "server", "start", "--host", host,
                                              "--port", str(prefect_port)], prefect_env)
        state["processes"]["prefect"] = pid
        _save_state(root, state)
        _await(f"{mlflow_url}/health", "MLflow server", state["processes"]["mlflow"], root / "mlflow.log")
        ensure_mlflow_user(mlflow_url, creds)
        _await(f"{prefect_url}/health", "Prefect server", pid, root / "prefect.log")
        state |= {"mlflow_tracking_uri": mlflow_url, "prefect_api_url": prefect_url}
        client_env = {"MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": prefect_url, **creds.client_env()}
        if pool:
            # The worker, and the flow runs a process worker starts, log in with the pipeline's credentials.
            worker_env = {**base_env, **client_env, "PREFECT_HOME": str(root / "prefect")}
            create_pool(pool, pool_type, worker_env, pool_secrets_file(root, creds))
            pid = _start_daemon(root, f"worker-{pool}", [prefect_executable(), "worker", "start", "--pool", pool,
                                                         "--type", pool_type, "--name", f"ufo-{pool}"], worker_env)
            state["processes"][f"worker-{pool}"] = pid
            state["pool"] = {"name": pool, "type": pool_type}
        write_private(root / "env.sh", env_script(client_env))
        _save_state(root, state)
    except BaseException:
        down()
        raise
    return state


def _mlflow_auth_call(url: str, method: str, path: str, creds: StackCredentials, body: dict | None = None) -> int:
    """One call of MLflow's auth REST API as the admin; its HTTP status."""
    token = base64.b64encode(f"{creds.mlflow_admin}:{creds.mlflow_admin_password}".encode()).decode()
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 -- the stack's own server
            return resp.status
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ConfigError(f"the stack's MLflow server refused its admin {creds.mlflow_admin} with the password "
                              f"in {credentials_path(stack_dir())}: the file does not belong to this stack's auth "
                              "database; restore the right one, or remove the stack folder to start afresh") from None
        if err.code == 404:
            return 404
        raise RuntimeError(f"MLflow's auth API answered HTTP {err.code} to {method} {path}: "
                           f"{err.read().decode(errors='replace')[:500]}") from None


def ensure_mlflow_user(url: str, creds: StackCredentials) -> None:
    """The pipeline's MLflow user, with the credentials file's password (made at the first start; its
    password set again on later ones, so the file stays the truth). It is no admin: it creates experiments,
    runs and registered models (and so MANAGEs them) and reads the rest (default_permission)."""
    user = {"username": creds.mlflow_user, "password": creds.mlflow_password}
    if _mlflow_auth_call(url, "GET", f"/api/2.0/mlflow/users/get?username={creds.mlflow_user}", creds) == 404:
        _mlflow_auth_call(url, "POST", "/api/2.0/mlflow/users/create", creds, user)
    else:
        _mlflow_auth_call(url, "PATCH", "/api/2.0/mlflow/users/update-password", creds, user)


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
    _run([prefect_executable(), *cmd], f"prefect work-pool {'update' if exists else 'create'} {pool}", env)


def down() -> list[str]:
    """Stop everything the stack started (workers, servers, then PostgreSQL); return what was stopped."""
    root = stack_dir()
    state = _load_state(root)
    stopped = []
    procs = state.get("processes", {})
    for name in sorted(procs, key=lambda n: (not n.startswith("worker"), n != "prefect", n)):
        if alive(procs[name]):
            stop(procs[name], grace_seconds=10.0)
            stopped.append(name)
    if (pg_home(root) / "pg" / "postmaster.pid").is_file():
        stop_postgres(root)
        stopped.append("postgres")
    if root.is_dir():
        _save_state(root, {"processes": {}, "root": str(root)})
    return stopped


def status() -> dict[str, str]:
    root = stack_dir()
    state = _load_state(root)
    out = {name: ("running" if alive(pid) else "stopped") + f" (pid {pid})"
           for name, pid in state.get("processes", {}).items()}
    out["postgres"] = "running" if (pg_home(root) / "pg" / "postmaster.pid").is_file() else "stopped"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ufo stack", description="PostgreSQL + MLflow server + Prefect server "
                                "(+ a work pool and its worker) on this machine")
    sub = p.add_subparsers(dest="action", required=True)
    up_p = sub.add_parser("up", help="start the stack")
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
    args = p.parse_args(argv)
    if args.action == "up":
        try:
            state = up(args.pool, args.pool_type, args.mlflow_port, args.prefect_port, args.postgres_port,
                       listen_address(args.listen))
        except RuntimeError as err:  # a server did not start; `up` stopped what it had started
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"MLflow:  {state['mlflow_tracking_uri']}\nPrefect: {state['prefect_api_url']} (UI: "
              f"{state['prefect_api_url'].removesuffix('/api')})")
        if "pool" in state:
            print(f"work pool {state['pool']['name']} ({state['pool']['type']}) with a worker")
        print(f"Use it:  source {stack_dir() / 'env.sh'}\nStop it: ufo stack down")
    elif args.action == "down":
        stopped = down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        for name, st in status().items():
            print(f"{name:<16}{st}")
    return 0
