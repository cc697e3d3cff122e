"""The stack's credentials: made once by `ufo stack up`, kept in the stack folder, handed to clients.

`ufo stack up` turns authentication on in all three servers (see infra/README.md, "Credentials"):
  - PostgreSQL: password (scram-sha-256) logins only. `ufo_admin` is the superuser that `initdb` makes
    and that only `ufo stack up` uses (roles, databases); `ufo` owns the databases `mlflow`, `prefect`
    and `mlflow_auth` and is no superuser, so the servers that log in as `ufo` cannot read files or run
    programs as the `postgres` user.
  - MLflow: the basic-auth app. `admin` manages users; `ufo-pipeline` is the user `ufo run` and its
    stages log in as (it gets MANAGE on the experiments and models it creates).
  - Prefect: one API auth string, which the server checks on every request but its health check.

They are generated at the first `up` (`secrets`, 256 bits each), written to `stack/credentials.json`
(mode 0600) and reused by every later `up`: PostgreSQL and MLflow keep them in their databases. What a
client needs is in `stack/env.sh` (mode 0600 too). A stage elsewhere (a container) gets the MLflow
credentials as a mounted file (`write_secrets_file`, read by `stages.common.runtime.load_secrets_file`),
not as environment variables, which `docker inspect` shows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shlex
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.common.config import ConfigError

#: The environment variables that carry a client's credentials (read by MLflow's and Prefect's clients).
MLFLOW_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PREFECT_CREDENTIAL_ENV = ("PREFECT_API_AUTH_STRING",)


def _token() -> str:
    # URL-safe characters only: the values go into URLs' userinfo, env.sh and KEY=VALUE files unquoted.
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class StackCredentials:
    pg_superuser_password: str
    pg_password: str
    mlflow_admin_password: str
    mlflow_password: str
    prefect_auth_string: str
    mlflow_flask_secret_key: str
    """Signs the MLflow UI's CSRF tokens (MLFLOW_FLASK_SERVER_SECRET_KEY); the same for every worker."""
    pg_superuser: str = "ufo_admin"
    pg_user: str = "ufo"
    mlflow_admin: str = "admin"
    mlflow_user: str = "ufo-pipeline"

    @classmethod
    def generate(cls) -> StackCredentials:
        return cls(pg_superuser_password=_token(), pg_password=_token(), mlflow_admin_password=_token(),
                   mlflow_password=_token(), prefect_auth_string=f"ufo:{_token()}",
                   mlflow_flask_secret_key=_token())

    def client_env(self) -> dict[str, str]:
        """What a client of the stack (`ufo run`, a worker, a stage on this machine) needs to log in."""
        return {"MLFLOW_TRACKING_USERNAME": self.mlflow_user, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
                "PREFECT_API_AUTH_STRING": self.prefect_auth_string}


def credentials_path(root: Path) -> Path:
    return root / "credentials.json"


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` atomically, readable by its owner only from the first byte on (a file made
    with the default umask and chmod-ed afterwards is readable by everyone in between)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)  # the umask may have taken bits away; never adds any
    tmp.replace(path)


def load_or_create(root: Path) -> tuple[StackCredentials, bool]:
    """The stack's credentials, generated and saved (0600) if there are none yet.

    Returns:
        (credentials, created): created is True when they were generated now.
    """
    path = credentials_path(root)
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} holds the stack's passwords but others may read it (mode "
                              f"{path.stat().st_mode & 0o777:o}); `chmod 600 {path}`, and change the passwords if "
                              "someone else could have read them")
        try:
            return StackCredentials(**json.loads(path.read_text())), False
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{path}: not the stack's credentials file ({err}); restore it from a backup, or "
                              "remove the stack folder to start a new stack (its runs are lost)") from None
    creds = StackCredentials.generate()
    write_private(path, json.dumps(asdict(creds), indent=2) + "\n")
    return creds, True


def env_script(values: dict[str, str]) -> str:
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())


def client_secrets() -> dict[str, str]:
    """The MLflow credentials of this process's environment that a stage elsewhere needs."""
    return {k: os.environ[k] for k in MLFLOW_CREDENTIAL_ENV if os.environ.get(k)}


def secrets_text(values: dict[str, str]) -> str:
    """KEY=VALUE lines, the format `stages.common.runtime.load_secrets_file` reads."""
    for key, value in values.items():
        if "\n" in value:
            raise ConfigError(f"{key} holds a line break, which a secrets file cannot carry")
    return "".join(f"{key}={value}\n" for key, value in values.items())


@contextlib.contextmanager
def secrets_file(folder: Path, values: dict[str, str]) -> Iterator[Path | None]:
    """A file of `values` (KEY=VALUE lines) for as long as the context lasts, to bind-mount read-only into
    a container; None when there is nothing to hand over.

    The file is 0444 inside a folder of its own that only its owner may enter (0700): the container's
    user (uid 10001 in the stage images, not this process's) reads it through the mount, while other users
    of this machine cannot reach it.
    """
    if not values:
        yield None
        return
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix="secrets-", dir=folder))  # 0700
    path = private / "credentials"
    try:
        write_private(path, secrets_text(values), mode=0o444)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()


# --- MLflow's users (the basic-auth app of the stack's server) -------------------------------------


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


def _mlflow_auth_call(url: str, method: str, path: str, creds: StackCredentials, where: Path,
                      body: dict | None = None) -> int:
    """One call of MLflow's auth REST API as the admin (`where`: the credentials file, for the error); its HTTP
    status."""
    token = base64.b64encode(f"{creds.mlflow_admin}:{creds.mlflow_admin_password}".encode()).decode()
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 -- the stack's own server
            return resp.status
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ConfigError(f"the stack's MLflow server refused its admin {creds.mlflow_admin} with the password "
                              f"in {where}: the file does not belong to this stack's auth "
                              "database; restore the right one, or remove the stack folder to start afresh") from None
        if err.code == 404:
            return 404
        raise RuntimeError(f"MLflow's auth API answered HTTP {err.code} to {method} {path}: "
                           f"{err.read().decode(errors='replace')[:500]}") from None


def ensure_mlflow_user(url: str, creds: StackCredentials, where: Path) -> None:
    """The pipeline's MLflow user, with the credentials file's password (made at the first start; its
    password set again on later ones, so the file stays the truth). It is no admin: it creates experiments,
    runs and registered models (and so MANAGEs them) and reads the rest (default_permission)."""
    user = {"username": creds.mlflow_user, "password": creds.mlflow_password}
    if _mlflow_auth_call(url, "GET", f"/api/2.0/mlflow/users/get?username={creds.mlflow_user}", creds, where) == 404:
        _mlflow_auth_call(url, "POST", "/api/2.0/mlflow/users/create", creds, where, user)
    else:
        _mlflow_auth_call(url, "PATCH", "/api/2.0/mlflow/users/update-password", creds, where, user)
