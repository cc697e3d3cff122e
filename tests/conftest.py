"""Shared fixtures (pytest finds them here; what tests call is in tests/helpers.py):

- workspaces: an isolated SQLite MLflow store + artifact folder per test (`workspace`) or per module
  (`module_workspace`);
- the tiny models, built once per session: `tiny` (the character-level Llama) and `tiny_chat` (the Qwen2
  chat model with its locally trained BPE tokenizer), built exactly as the SFT stage builds them;
- the upstream Outputs a stage test starts from, logged into the module's workspace: `curated` (the
  curate stage's synthetic default) and `upstream` (the tiny model as the SFT model, its problems as the
  train split);
- `ufo_workspace`: a workspace for a real `ufo run` whose databases exist already, as after a first
  run (`migrated_stores`, created once per session).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything (set before HF libraries load)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from stages.common.chat import ChatFormat, build_char_tokenizer  # noqa: E402
from stages.common.contracts import CurateOutput, SFTOutput  # noqa: E402
from stages.common.episodes import Problem, rollout  # noqa: E402
from stages.common.model import build_model, new_scratch_model, save_pretrained  # noqa: E402
from stages.common.model_spec import ModelConfig  # noqa: E402
from tests.helpers import (  # noqa: E402
    FEEDBACK,
    REPO,
    TINY_CHAT,
    log_upstream,
    multiplication_problems,
    use_workspace,
    with_stores,
    workspace_tracking_uri,
)

#: The modules that take longest (each runs real `ufo` pipelines; measured with --durations), longest
#: first. They are collected first, so that under pytest-xdist (`make test` runs two workers, each taking
#: whole files) the longest module never starts last and leaves the other worker idle.
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_faults.py", "test_ablate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def migrated_stores(tmp_path_factory) -> Path:
    """An MLflow store and a Prefect database with every migration applied (`mlflow.db`,
    `prefect/prefect.db`): what a workspace holds after its first `ufo run`.

    Creating them is the slowest part of a first run's start on 2 busy cores (MLflow's ~3 s; Prefect's
    ~8 s of its server's ~14 s), paid again by every test that starts from an empty workspace. Tests whose
    subject is not that first start take copies (`module_workspace`: the MLflow store; `ufo_workspace`:
    both); the first start itself stays tested (test_pipeline_e2e.py's pipeline, and in test_faults.py two
    pipelines at once in a fresh workspace and a SIGTERM while the server starts).
    """
    from flows.server import prefect_executable

    root = tmp_path_factory.mktemp("stores")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    create = "import sys, mlflow; mlflow.MlflowClient(tracking_uri=sys.argv[1]).search_experiments()"
    for cmd, extra in (([sys.executable, "-c", create, workspace_tracking_uri(root)], {}),
                       ([prefect_executable(), "server", "database", "upgrade", "-y"],
                        {"PREFECT_HOME": str(root / "prefect"), "DO_NOT_TRACK": "1"})):
        proc = subprocess.run(cmd, cwd=REPO, env=env | extra, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "mlflow.db").is_file() and (root / "prefect" / "prefect.db").is_file()
    return root


@pytest.fixture
def workspace(tmp_path, monkeypatch, migrated_stores) -> Path:
    """A workspace of the test's own, its MLflow store already created."""
    return use_workspace(monkeypatch, with_stores(tmp_path / "ufo", migrated_stores, prefect=False))


@pytest.fixture(scope="module")
def module_workspace(tmp_path_factory, migrated_stores):
    """A workspace for the module's in-process stage runs, its MLflow store already created."""
    with pytest.MonkeyPatch.context() as mp:
        yield use_workspace(mp, with_stores(tmp_path_factory.mktemp("ufo"), migrated_stores, prefect=False))


@pytest.fixture
def ufo_workspace(tmp_path, migrated_stores) -> Path:
    """`tmp_path`/ws for a real `ufo run`, its MLflow and Prefect databases already migrated (as after a
    first run)."""
    return with_stores(tmp_path / "ws", migrated_stores)


@pytest.fixture(scope="session")
def tiny() -> tuple[torch.nn.Module, ChatFormat, list[Problem]]:
    """A randomly initialised tiny policy: it answers garbage, which exercises every path of an episode
    (wrong answers, feedback turns, answers cut off without eos)."""
    problems = multiplication_problems()
    tokenizer = build_char_tokenizer([p.question for p in problems], FEEDBACK)
    torch.manual_seed(0)
    model = new_scratch_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tokenizer)
    return model.eval(), ChatFormat(tokenizer, FEEDBACK), problems


@pytest.fixture(scope="session")
def tiny_chat() -> tuple[torch.nn.Module, ChatFormat, list[Problem]]:
    """A random Qwen2 policy (`TINY_CHAT`) with the locally trained BPE tokenizer and its ChatML template:
    it answers garbage, so episodes run all their turns and exercise answers cut off without eos. Its
    users only read it or take gradients (after zeroing them)."""
    problems = multiplication_problems()
    texts = [p.question for p in problems] + [p.answer for p in problems]
    torch.manual_seed(0)
    model, tokenizer = build_model(TINY_CHAT, texts, FEEDBACK, torch.device("cpu"))
    return model.eval(), ChatFormat(tokenizer, FEEDBACK), problems


@pytest.fixture(scope="session")
def tiny_rollout(tiny, tmp_path_factory) -> tuple[Path, ChatFormat, list]:
    """`tiny` saved the way the SFT stage saves its model (the folder RL loads), and one rollout of it:
    4 problems x 4 episodes of up to 3 turns. Read only."""
    model, fmt, problems = tiny
    folder = save_pretrained(model, fmt.tokenizer, tmp_path_factory.mktemp("tiny") / "model")
    torch.manual_seed(3)
    episodes = rollout(model, fmt, problems[:4], group_size=4, max_turns=3, temperature=1.0, max_new_tokens=6)
    return folder, fmt, episodes


@pytest.fixture(scope="module")
def curated(module_workspace):
    """The curate stage's synthetic default (3-digit x 1-digit multiplication), in the module's workspace."""
    from stages import curate

    return curate.run(curate.Config(experiment="curated"))


@pytest.fixture(scope="module")
def upstream(module_workspace, tiny, tmp_path_factory) -> tuple[CurateOutput, SFTOutput]:
    """What curate and SFT would hand over to RL, logged as they log it but in a second: the `tiny` random
    model as the SFT model and its 64 problems as the train split, in the module's workspace."""
    model, fmt, problems = tiny
    return log_upstream(model, fmt, {"train": problems}, tmp_path_factory.mktemp("upstream"), "upstream")
