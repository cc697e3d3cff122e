"""Where runs live: the workspace folder and the MLflow tracking URI. No MLflow import here, so the
CLI can name them (and refuse bad input) before loading anything heavy."""

from __future__ import annotations

import os
from pathlib import Path

#: Workspace holding the local SQLite tracking DB, the artifact folder and Prefect's home.
WORKSPACE_ENV = "UFO_HOME"
DEFAULT_WORKSPACE = ".ufo"


def workspace() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE)).resolve()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite DB in the workspace (the file store is deprecated)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    ws = workspace()
    ws.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{ws / 'mlflow.db'}"


def artifact_root() -> str:
    return (workspace() / "mlartifacts").as_uri()


def unclosed_runs_journal() -> Path:
    """The MLflow runs a `ufo` could not close because the tracking server did not answer (flows/runs.py)."""
    return workspace() / "runs" / "unclosed.json"
