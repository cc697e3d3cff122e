"""The team stack's PostgreSQL cluster (`ufo stack`, flows/stack.py): initialised once with password logins
only (scram-sha-256, the Unix socket included), started and stopped with `pg_ctl`, and run as the
`postgres` user when `ufo stack` runs as root. It holds the databases the `ufo` role owns (no superuser):
MLflow's runs, Prefect's, and MLflow's users and permissions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from flows.credentials import StackCredentials, credentials_path, write_private
from stages.common.config import ConfigError
from stages.common.processes import alive

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")
#: The databases the `ufo` role owns: MLflow's runs, Prefect's, and MLflow's users and permissions.
DATABASES = ("mlflow", "prefect", "mlflow_auth")


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


def run_checked(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
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
            run_checked(_as_postgres([_pg_tool("initdb"), "-D", str(data), "-U", creds.pg_superuser,
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
    run_checked(_as_postgres([_pg_tool("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                       f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]), "pg_ctl start")
    _ensure_role_and_databases(root, port, creds)
    return f"{creds.pg_user}@127.0.0.1:{port}"


def _password_auth(data: Path) -> bool:
    """Whether the cluster's pg_hba.conf asks every connection for a password (no `trust` line)."""
    lines = [line.split() for line in (data / "pg_hba.conf").read_text().splitlines()]
    return not any(fields and not fields[0].startswith("#") and "trust" in fields for fields in lines)


def _ensure_role_and_databases(root: Path, port: int, creds: StackCredentials) -> None:
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
                          f"{credentials_path(root)} ({str(err).strip()}); the file does not belong to this "
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


def postgres_pid(root: Path) -> int | None:
    """The postmaster's pid while it runs (from its postmaster.pid), else None."""
    try:
        pid = int((pg_home(root) / "pg" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None
