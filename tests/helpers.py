"""What tests call: paths, the `ufo` command as a user runs it, MLflow and Prefect queries, the process
table, and the small data the tiny models are built on. Fixtures are in conftest.py (pytest finds them);
a test imports this module, never conftest."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common.episodes import Problem
from stages.common.model_spec import ModelConfig
from stages.common.processes import alive

REPO = Path(__file__).resolve().parents[1]
# The real data files live beside the repository (never in it); a git worktree or a copy elsewhere
# finds them through UFO_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("UFO_SHARED_DATA") or REPO.parent / "shared" / "data")
FEEDBACK = "Let's try again."
#: The smallest real pipeline (every stage for real on a tiny budget), for the fault and cache tests.
MICRO = "tests/configs/micro.yaml"


#: The tiny Qwen2 chat model (`tiny_chat` fixture): 1 layer, grouped-query attention, BPE tokenizer.
TINY_CHAT = ModelConfig(init="scratch_chat", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_position_embeddings=192)


def multiplication_problems(n: int = 64) -> list[Problem]:
    return [Problem(f"mul/{a}x{b}", f"{a}*{b}", str(a * b)) for a in range(100, 100 + n) for b in (3,)]


def log_upstream(model, fmt, splits: dict[str, list[Problem]], folder: Path, experiment: str):
    """Log what the curate and SFT stages hand on, as they log it but in a second: `splits` (name ->
    problems; `eval/<set>` for an evaluation set) as the curate Output's parquet files, and `model` with
    its tokenizer as the SFT Output's model folder, each in its own run of `experiment`.

    Returns:
        (CurateOutput, SFTOutput)
    """
    import mlflow
    import pandas as pd

    from stages.common.contracts import CurateOutput, SFTOutput
    from stages.common.model import save_pretrained
    from stages.common.tracking import configure, log_artifact

    configure(experiment)
    with mlflow.start_run(run_name="curate") as run:
        refs = {}
        for name, problems in splits.items():
            path = folder / f"{name.replace('/', '_')}.parquet"
            pd.DataFrame({"id": [p.id for p in problems], "question": [p.question for p in problems],
                          "answer": [p.answer for p in problems], "source": "multiplication"}).to_parquet(path)
            refs[name] = log_artifact(path, "data")
        data = CurateOutput(run_id=run.info.run_id, artifacts=refs)
    with mlflow.start_run(run_name="sft") as run:
        model_folder = save_pretrained(model, fmt.tokenizer, folder / "model")
        sft = SFTOutput(run_id=run.info.run_id, artifacts={"model": log_artifact(model_folder, "model")})
    return data, sft


# --- workspaces and the `ufo` command --------------------------------------------------------------


def workspace_tracking_uri(path: Path) -> str:
    """The SQLite MLflow store that `ufo run` creates in workspace `path` by default."""
    return f"sqlite:///{path / 'mlflow.db'}"


def use_workspace(mp: pytest.MonkeyPatch, path: Path) -> Path:
    """Point this process (UFO_HOME, MLFLOW_TRACKING_URI) at workspace `path` until `mp` is undone."""
    path.mkdir(parents=True, exist_ok=True)
    mp.setenv("UFO_HOME", str(path))
    mp.setenv("MLFLOW_TRACKING_URI", workspace_tracking_uri(path))
    return path


def with_stores(workspace: Path, stores: Path, *, prefect: bool = True) -> Path:
    """`workspace` holding copies of the databases in `stores` (the `migrated_stores` fixture): its MLflow
    store and, with `prefect`, its Prefect database."""
    for name in ("mlflow.db", "prefect/prefect.db") if prefect else ("mlflow.db",):
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stores / name, workspace / name)
    return workspace


def ufo_env(workspace: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a `ufo` in `workspace`: its default local stores unless `extra` says."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return {**env, "UFO_HOME": str(workspace), **extra}


def ufo_run(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    """`ufo run ARGS` as a user runs it: workspace `workspace`, its default tracking store."""
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], cwd=REPO, env=ufo_env(workspace),
                          capture_output=True, text=True, timeout=1200)


def start_ufo(workspace: Path, *args: str, log: Path, **env: str) -> subprocess.Popen:
    """`ufo ARGS` in its own session (a terminal's process group: the test may signal all of it),
    stdout+stderr to `log`."""
    workspace.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")  # noqa: SIM115 -- owned by the process, closed by the OS when it exits
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=ufo_env(workspace, **env),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until `text` appears in `log`; fail (showing the log) if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"ufo exited ({proc.returncode}) before printing {text!r}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"{text!r} not printed within {timeout} s:\n{log.read_text()[-4000:]}")


class Stack:
    """`ufo stack ...` and `ufo ...` against a stack in the workspace `home` (`ufo stack up` there)."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {**os.environ, "UFO_HOME": str(home),
                    # Schedules and workers react in seconds, not the default minute (test only).
                    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
                    "PREFECT_WORKER_QUERY_SECONDS": "3", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY"):
            self.env.pop(key, None)

    def ufo(self, *args: str, timeout: float = 1800, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                              env={**self.env, **env}, timeout=timeout)

    def load_env(self) -> dict[str, str]:
        """What `source stack/env.sh` exports, added to `env`; returned."""
        exported = {}
        for line in (self.home / "stack" / "env.sh").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            exported[key] = shlex.split(value)[0] if value else ""
        self.env |= exported
        return exported


# --- MLflow and Prefect, as a user queries them ----------------------------------------------------


def find_runs(filter_string: str) -> list:
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string, output_format="list")


def metric_history(run_id: str, key: str) -> list[float]:
    """Every value the run logged for `key`, in step order."""
    return [value for _, value in metric_histories(run_id, keys=[key])[key]]


def metric_histories(run_id: str, keys: list[str] | None = None,
                     skip: tuple[str, ...] = ()) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every logged metric (or of `keys`), in step order; metrics whose names start with
    one of `skip` are left out."""
    import mlflow

    client = mlflow.MlflowClient()
    if keys is None:
        keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(skip)]
    return {k: sorted(((m.step, m.value) for m in client.get_metric_history(run_id, k)), key=lambda sv: sv[0])
            for k in keys}


def prefect_states(workspace: Path) -> dict[str, list[tuple[str, str]]]:
    """(name, state type) of every flow run and task run in the workspace's Prefect database."""
    import sqlite3

    db = sqlite3.connect(workspace / "prefect" / "prefect.db")
    try:
        return {table: db.execute(f"select name, state_type from {table}").fetchall()
                for table in ("flow_run", "task_run")}
    finally:
        db.close()


# --- processes -------------------------------------------------------------------------------------


def processes_of(workspace: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live process started for `workspace` (they all inherit UFO_HOME)."""
    marker = f"UFO_HOME={workspace}".encode()
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                state = (proc_dir / "stat").read_text().split(") ")[-1][:1]
                if state != "Z":  # a zombie is dead, only not yet reaped by its parent
                    found.append((int(proc_dir.name), (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


def gone_within(pid: int, seconds: float) -> bool:
    """Whether process `pid` has exited within `seconds` (a hang guard, not a timing: it returns at once)."""
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def prefect_client(env: dict[str, str]):
    """A Prefect client of the stack's server, with its auth string (`env`: the stack's `env.sh`; settings
    are read once per process: override them)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        yield client


def http_status(url: str, auth: str | None = None) -> int | None:
    """HTTP status of GET `url` (with `Authorization: Basic base64(auth)` if given); None if nothing answers."""
    import base64
    import urllib.error
    import urllib.request

    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:  # noqa: S310
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None
