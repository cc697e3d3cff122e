"""MLflow I/O shared by every stage: where runs live, how artifacts go in with a digest and come out
verified.

A stage's `Output` names its MLflow run and its artifacts as `runs:/<run_id>/<path>` URIs with sha256
digests. The next stage gets only that Output; `fetch_verified` downloads by URI and refuses to go on
if the bytes are not the ones the producer logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from stages.common.config import StageConfig, dump_yaml
from stages.common.contracts import ArtifactRef, StageOutput
from stages.common.runtime import Terminated, acknowledge_stop, failpoint
from stages.common.workspace import artifact_root, tracking_uri

# Tags that make runs findable: the pipeline run, and each stage's child run.
TAG_KIND = "ufo.kind"
TAG_STAGE = "ufo.stage"
TAG_PARENT = "mlflow.parentRunId"
#: Why a run ended FAILED or KILLED (set by the stage itself, or by the flow when the stage died).
TAG_FAILURE = "ufo.failure"
#: The MLflow UI's experiment type (set on every experiment this project creates).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
#: Where a stage run keeps its own Output.
OUTPUT_ARTIFACT = "ufo/output.json"

Out = TypeVar("Out", bound=StageOutput)


class DigestMismatchError(RuntimeError):
    """An artifact's bytes do not match the digest its producer recorded."""


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
    if exp is None or exp.tags.get(TAG_EXPERIMENT_KIND) != "custom_model_development":
        # The MLflow 3 UI otherwise guesses "GenAI apps & agents" (traces, evaluations) for a new
        # experiment; this one trains models: open it on runs, metrics and artifacts.
        client.set_experiment_tag(exp_id, TAG_EXPERIMENT_KIND, "custom_model_development")
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


#: MLflow's limit on the metrics of one `log_batch` call (its REST API refuses more).
MAX_METRICS_PER_BATCH = 1000


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Every metric of `metrics` on `run_id` at `step`, in batches MLflow accepts: an ablation with seed
    spreads logs more than one batch holds, and cutting the list at the limit lost the rest silently."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
    for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[start:start + MAX_METRICS_PER_BATCH])


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


@dataclass
class StageContext:
    """What a stage's body gets besides its config."""

    run_id: str
    """The stage's MLflow run (active while the body runs)."""
    workdir: Path
    """A scratch folder, removed when the stage ends: downloads and files to log go here."""


def run_stage(stage: str, config: StageConfig, body: Callable[[Any, StageContext], Out], *,
              parent_run_id: str | None = None, run_id: str | None = None) -> Out:
    """Run `body(config, ctx)` inside the stage's MLflow run and return its Output.

    The run is `run_id` when given (the flow creates each stage's run before launching it, so it can
    close the run itself if the process dies), else a new run, child of `parent_run_id` when given.
    The resolved config is logged, then the body runs; its Output is logged as `ufo/output.json`
    (how the flow, the stage cache and `--from-run` read it back) and the run ends FINISHED. It ends
    FAILED on an exception and KILLED on an interrupt, with the reason in the tag `ufo.failure`, so a
    later stage or a rerun never mistakes a half-done stage for a finished one.
    """
    configure(config.experiment)
    if run_id:
        active = mlflow.start_run(run_id=run_id)
    else:
        active = mlflow.start_run(run_name=stage, parent_run_id=parent_run_id, tags={TAG_STAGE: stage})
    try:
        mlflow.log_text(dump_yaml(config), "config/resolved.yaml")
        mlflow.log_params(_flat_params(config.model_dump(mode="json")))
        failpoint(f"{stage}.started")
        with tempfile.TemporaryDirectory(prefix=f"ufo-{stage}-") as tmp:
            output = body(config, StageContext(active.info.run_id, Path(tmp)))
        mlflow.log_dict(output.model_dump(mode="json"), OUTPUT_ARTIFACT)
    except (KeyboardInterrupt, Terminated) as err:
        acknowledge_stop()
        _end(active.info.run_id, "KILLED", f"interrupted ({type(err).__name__})")
        raise
    except BaseException as err:
        _end(active.info.run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise
    mlflow.end_run("FINISHED")
    return output


def _end(run_id: str, status: str, reason: str) -> None:
    """End the active run with `status`, recording why; never raises (it runs while handling an error).

    If the tracking server is what failed, it does not try: every call would retry for the whole
    `flow.tracking_retry_seconds` again. The flow closes the run, now or once the server is back.
    """
    if tracking_server_down():
        logging.getLogger("ufo.tracking").warning("could not mark run %s %s: the tracking server %s does not "
                                                  "answer", run_id, status, tracking_uri())
        return
    try:
        mlflow.set_tag(TAG_FAILURE, reason[:4000])
        mlflow.end_run(status)
    except Exception as err:  # the tracking server may be what failed
        logging.getLogger("ufo.tracking").warning("could not mark run %s %s: %s", run_id, status, err)


def tracking_server_down(uri: str | None = None, timeout: float = 3.0) -> bool:
    """Whether `uri` (default: this process's tracking URI) is an MLflow server that does not answer its
    health check now: one request, no retries. A local store is never down."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return False
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):  # noqa: S310 -- the user's server
            return False
    except urllib.error.HTTPError:
        return False  # it answers, if not with 200
    except (urllib.error.URLError, OSError):
        return True


def read_output(run_id: str, output_type: type[Out]) -> Out:
    """The Output a finished stage run logged (`ufo/output.json`)."""
    return output_type.model_validate(mlflow.artifacts.load_dict(f"runs:/{run_id}/{OUTPUT_ARTIFACT}"))


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


# --- datasets and models as MLflow sees them ---------------------------------------------------------

#: The Output artifact naming a stage's MLflow model (`models:/<model_id>`), beside its plain `model` folder.
MLFLOW_MODEL_ARTIFACT = "mlflow_model"
#: What an MLflow model needs to be loaded back (`mlflow.transformers.load_model`). Given explicitly:
#: MLflow otherwise infers them by loading the model in a subprocess (seconds, and it pulls in
#: torchvision for the pipeline); torch is pinned to the build this project runs on.
MODEL_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.0,<6", "tokenizers>=0.21", "safetensors>=0.4"]


def _run_artifact_source(uri: str):
    """An MLflow dataset source naming a run artifact by its `runs:/` URI, the address every stage uses
    (MLflow registers no source type for `runs:/` or `mlflow-artifacts:/` URIs)."""
    from mlflow.data.dataset_source import DatasetSource

    class RunArtifactSource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "mlflow_run_artifact"

        def load(self, dst_path: str | None = None) -> str:
            return mlflow.artifacts.download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("runs:/")

        @classmethod
        def _resolve(cls, raw_source: Any) -> RunArtifactSource:
            return cls(raw_source)

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> RunArtifactSource:
            return cls(source_dict["uri"])

    return RunArtifactSource(uri)


def log_dataset(name: str, ref: ArtifactRef, path: str | Path, context: str) -> None:
    """Record the parquet split at `path` (logged as `ref`) as an input dataset of the active run.

    `mlflow.log_input` with OUR digest: MLflow's own hashes only the first 10,000 rows. Its digest field
    holds 36 characters, so it gets the first 32 hex digits of the file's sha256 (the whole content); the
    full sha256 and the row count go in the input's tags. The same (name, digest) is one dataset in
    MLflow: the curate run that wrote a split and every run that read it show the same entry.

    Args:
        name: the curate Output's artifact name (`train`, `val`, `test`, `eval/<set>`).
        context: `training`, `validation`, `testing` or `evaluation` (how the run used it).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    meta = pq.read_metadata(path)  # the footer only: schema and row count without reading the rows
    types = {pa.string(): DataType.string, pa.large_string(): DataType.string, pa.int64(): DataType.long}
    schema = Schema([ColSpec(types.get(f.type, DataType.string), f.name) for f in meta.schema.to_arrow_schema()])
    dataset = MetaDataset(_run_artifact_source(ref.uri), name=name, digest=ref.sha256[:32], schema=schema)
    mlflow.log_input(dataset, context=context, tags={"ufo.sha256": ref.sha256, "ufo.rows": str(meta.num_rows)})


def fetch_dataset(ref: ArtifactRef, dst: str | Path, *, name: str, context: str) -> Path:
    """`fetch_verified` for a curated split a stage consumes, recorded as an input of its run
    (`log_dataset`): the run's page in the MLflow UI then names the data it was trained or evaluated on."""
    path = fetch_verified(ref, dst)
    log_dataset(name, ref, path, context)
    return path


def log_model(checkpoint: str | Path, name: str, *, description: str, tags: dict[str, str] | None = None,
              digest_tag: str | None = None) -> ArtifactRef:
    """Log a `save_pretrained` folder as an MLflow model (transformers flavour, text-generation) of the
    active run; return `models:/<model_id>` with the digest of what was uploaded.

    The model appears in the run's and the experiment's Models tab (with the run's params and step-0
    metrics), loads with `mlflow.transformers.load_model`, and is what the registry registers. The
    weights are loaded on CPU and saved once more by MLflow (`model/` + `components/tokenizer/` in its
    layout): a second copy of the checkpoint's bytes in the artifact store, downloaded once more to
    digest it (a local copy with the default store).

    `description` becomes the model card. Giving one also keeps MLflow from asking the Hugging Face Hub
    for the card of the base model's name; its licence lookup is refused offline (HF_HUB_OFFLINE=1).
    `tags` go on the logged model; `digest_tag` names a tag that receives the digest once the model is
    complete (so a search on it never finds a half-logged model).
    """
    import mlflow.transformers
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    info = mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, name=name, task="text-generation",
                                         model_card=ModelCard(description), pip_requirements=MODEL_REQUIREMENTS,
                                         tags=tags)
    del model
    # The digest of what the store holds, read back: MLflow writes files (MLmodel's model id, environment
    # files) after the flavour saved, so a digest of the local folder would never verify.
    with tempfile.TemporaryDirectory(prefix="ufo-model-") as tmp:
        stored = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=tmp)
        ref = ArtifactRef(uri=info.model_uri, sha256=sha256_path(stored))
    if digest_tag is not None:
        mlflow.set_logged_model_tags(info.model_id, {digest_tag: ref.sha256})
    return ref
