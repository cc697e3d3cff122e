"""MLflow I/O shared by every stage: where runs live, how artifacts go in with a digest and come out
verified.

A stage's `Output` names its MLflow run and its artifacts as `runs:/<run_id>/<path>` URIs with sha256
digests. The next stage gets only that Output; `fetch_verified` downloads by URI and refuses to go on
if the bytes are not the ones the producer logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field

from stages.common.config import StrictModel, dump_yaml

#: Workspace holding the local SQLite tracking DB, the artifact folder and Prefect's home.
WORKSPACE_ENV = "UFO_HOME"
DEFAULT_WORKSPACE = ".ufo"

# Tags that make runs findable: the pipeline run, and each stage's child run.
TAG_KIND = "ufo.kind"
TAG_STAGE = "ufo.stage"
TAG_PARENT = "mlflow.parentRunId"


class DigestMismatchError(RuntimeError):
    """An artifact's bytes do not match the digest its producer recorded."""


class ArtifactRef(StrictModel):
    """A logged artifact (file or folder) addressed by URI and content digest."""

    uri: str
    """`runs:/<run_id>/<artifact_path>`."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the file, or of the sorted (relative path, file sha256) list of a folder."""


class StageOutput(StrictModel):
    """What a stage hands to the next one: small, typed, JSON-serialisable. Never tensors."""

    stage: str
    run_id: str
    artifacts: dict[str, ArtifactRef] = {}
    metrics: dict[str, float] = {}

    def artifact(self, name: str) -> ArtifactRef:
        if name not in self.artifacts:
            raise KeyError(f"{self.stage} output (run {self.run_id}) has no artifact {name!r}; "
                           f"it has {sorted(self.artifacts)}")
        return self.artifacts[name]


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


def configure(experiment: str) -> str:
    """Point MLflow at the tracking server and experiment; return the experiment id."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes inherit the same store
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # A local SQLite store would otherwise put artifacts in ./mlruns of whatever cwd runs it.
        location = artifact_root() if uri.startswith("sqlite:") else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently by another process
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Digest of a file, or of a folder as the sorted (relative path, file digest) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    listing = [
        f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}"
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def log_artifact(local_path: str | Path, artifact_path: str) -> ArtifactRef:
    """Log a file or folder to the active run under `artifact_path`; return its URI and digest.

    A file lands at `<artifact_path>/<file name>` and a folder's contents at `<artifact_path>/`.
    """
    local_path = Path(local_path)
    digest = sha256_path(local_path)
    run_id = mlflow.active_run().info.run_id
    if local_path.is_dir():
        mlflow.log_artifacts(str(local_path), artifact_path)
        uri = f"runs:/{run_id}/{artifact_path}"
    else:
        mlflow.log_artifact(str(local_path), artifact_path)
        uri = f"runs:/{run_id}/{artifact_path}/{local_path.name}"
    return ArtifactRef(uri=uri, sha256=digest)


def fetch_verified(ref: ArtifactRef, dst: str | Path | None = None) -> Path:
    """Download `ref` and check its digest; raise DigestMismatchError rather than use other bytes."""
    dst = Path(dst or tempfile.mkdtemp(prefix="ufo-fetch-"))
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(dst)))
    actual = sha256_path(local)
    if actual != ref.sha256:
        raise DigestMismatchError(
            f"artifact {ref.uri}: sha256 {actual} does not match the recorded {ref.sha256}; "
            "it was changed after it was logged (or the wrong run was given). Refusing to use it."
        )
    return local


@contextlib.contextmanager
def stage_run(stage: str, config: BaseModel, experiment: str,
              parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the stage's MLflow run (a child of the pipeline run when given), log its resolved config.

    The run ends FINISHED only if the body returns; an exception marks it FAILED, so a later stage or
    a rerun never mistakes a half-done stage for a finished one.
    """
    configure(experiment)
    tags = {TAG_STAGE: stage}
    with mlflow.start_run(run_name=stage, parent_run_id=parent_run_id, tags=tags) as run:
        mlflow.log_text(dump_yaml(config), "config/resolved.yaml")
        mlflow.log_params(_flat_params(config.model_dump(mode="json")))
        yield run


def _flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if "run_id" in v and "artifacts" in v:  # an upstream StageOutput: record only its run
                out[f"{key}.run_id"] = v["run_id"]
            else:
                out.update(_flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow caps a param value's length
    return out


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
