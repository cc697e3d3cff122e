"""Shared fixtures: an isolated workspace (SQLite MLflow store + artifact folder) per test or module,
and a tiny character-level tokenizer/model built exactly as the SFT stage builds them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything (set before HF libraries load)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow
import pytest
import torch

from stages.common.chat import ChatFormat, build_char_tokenizer
from stages.common.episodes import Problem
from stages.common.model import new_scratch_model
from stages.common.model_spec import ModelConfig

REPO = Path(__file__).resolve().parents[1]
# The real data files live beside the repository (never in it); a git worktree or a copy elsewhere
# finds them through UFO_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("UFO_SHARED_DATA") or REPO.parent / "shared" / "data")
FEEDBACK = "Let's try again."

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def workspace_tracking_uri(path: Path) -> str:
    """The SQLite MLflow store that `ufo run` creates in workspace `path` by default."""
    return f"sqlite:///{path / 'mlflow.db'}"


def use_workspace(mp: pytest.MonkeyPatch, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    mp.setenv("UFO_HOME", str(path))
    mp.setenv("MLFLOW_TRACKING_URI", workspace_tracking_uri(path))
    return path


def ufo_run(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    """`ufo run ARGS` as a user runs it: workspace `workspace`, its default tracking store."""
    env = {**os.environ, "UFO_HOME": str(workspace)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


def find_runs(filter_string: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string, output_format="list")


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    return use_workspace(monkeypatch, tmp_path / "ufo")


@pytest.fixture(scope="module")
def module_workspace(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield use_workspace(mp, tmp_path_factory.mktemp("ufo"))


def multiplication_problems(n: int = 64) -> list[Problem]:
    return [Problem(f"mul/{a}x{b}", f"{a}*{b}", str(a * b)) for a in range(100, 100 + n) for b in (3,)]


@pytest.fixture(scope="session")
def tiny() -> tuple[torch.nn.Module, ChatFormat, list[Problem]]:
    """A randomly initialised tiny policy: it answers garbage, which exercises every path of an episode
    (wrong answers, feedback turns, answers cut off without eos)."""
    problems = multiplication_problems()
    tokenizer = build_char_tokenizer([p.question for p in problems], FEEDBACK)
    torch.manual_seed(0)
    model = new_scratch_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tokenizer)
    return model.eval(), ChatFormat(tokenizer, FEEDBACK), problems


MICRO = "tests/configs/micro.yaml"


def ufo_env(workspace: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a `ufo` in `workspace`: its default local stores unless `extra` says."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return {**env, "UFO_HOME": str(workspace), **extra}


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


def prefect_states(workspace: Path) -> dict[str, list[tuple[str, str]]]:
    """(name, state type) of every flow run and task run in the workspace's Prefect database."""
    import sqlite3

    db = sqlite3.connect(workspace / "prefect" / "prefect.db")
    try:
        return {table: db.execute(f"select name, state_type from {table}").fetchall()
                for table in ("flow_run", "task_run")}
    finally:
        db.close()
