"""RL checkpoints in the stage's MLflow run, and resuming from them.

A checkpoint is a folder logged to the run as `checkpoints/step-NNNNNN/`: the policy's and the critic's
training engine states (`policy/`, `critic/`: weights and optimizer state, as safetensors + torch files
for the torch engine, as DeepSpeed's own checkpoint with one optimizer partition per rank for the
DeepSpeed engine), every RNG state, the step (the data position follows from it, see
`batch.step_problems`) and the metric history. Only after the upload completes does the
run's tag `ufo.rl.checkpoint` point at it (step, URI, sha256): a process killed mid-upload leaves
the tag on the previous, complete checkpoint. That is what makes writing it atomic for a reader.

Resuming: every run is tagged `ufo.rl.resume_key`, a digest of what determines its result (the config
minus `experiment`/`resume`/`checkpoint_every`, the input artifacts' sha256 instead of their run ids,
and the RL code). The flow gives a retried or rerun stage a NEW MLflow run, so resuming cannot key on
the run id: a starting run looks, in its experiment, for unfinished (RUNNING, FAILED or KILLED) runs
with its own key and continues from the newest checkpoint among them. FINISHED runs are skipped (a
`--force` rerun means "compute again"). The checkpoint travels through MLflow, so it works with every
launcher (local process, container, deployment) without a shared disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from stages.common.contracts import ArtifactRef
from stages.common.ranks import Ranks
from stages.common.tracking import fetch_verified, sha256_path
from stages.rl.config import Config
from stages.rl.models import Models

log = logging.getLogger("ufo.rl")

TAG_RESUME_KEY = "ufo.rl.resume_key"
TAG_CHECKPOINT = "ufo.rl.checkpoint"
TAG_RESUMED_FROM = "ufo.rl.resumed_from"
#: Config fields that do not change the result of a run (so not part of the resume key).
NOT_IN_KEY = ("experiment", "resume", "checkpoint_every")
_STAGES = Path(__file__).resolve().parents[1]


def code_digest() -> str:
    """sha256 of the RL stage's code and the shared code it runs (stages/rl, stages/common)."""
    h = hashlib.sha256()
    for f in sorted([*(_STAGES / "rl").rglob("*.py"), *(_STAGES / "common").rglob("*.py")]):
        h.update(f.relative_to(_STAGES).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def resume_key(cfg: Config) -> str:
    """What a resumable run must share with this one: config, input bytes, code."""
    data = cfg.model_dump(mode="json")
    for name in NOT_IN_KEY:
        data.pop(name, None)
    for name in ("data", "sft"):  # the bytes handed over matter, not which run produced them
        if data.get(name) is not None:
            data[name] = {k: ref["sha256"] for k, ref in sorted(data[name]["artifacts"].items())}
    payload = {"config": data, "code": code_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class Found:
    run_id: str
    step: int
    ref: ArtifactRef


def find_checkpoint(key: str, experiment_id: str, current_run_id: str) -> Found | None:
    """The newest checkpoint among unfinished runs with resume key `key` (None if there is none)."""
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{TAG_RESUME_KEY}` = '{key}'",
                                      max_results=1000)
    best: tuple[int, int, Found] | None = None
    for run in runs:
        tag = run.data.tags.get(TAG_CHECKPOINT)
        if run.info.run_id == current_run_id or run.info.status == "FINISHED" or not tag:
            continue
        meta = json.loads(tag)
        rank = (meta["step"], run.info.start_time)
        if best is None or rank > best[:2]:
            found = Found(run.info.run_id, meta["step"], ArtifactRef(uri=meta["uri"], sha256=meta["sha256"]))
            best = (*rank, found)
    return best[2] if best else None


def save_checkpoint(models: Models, step: int, data_position: int, history: list[dict[str, float]],
                    workdir: Path, run_id: str, ranks: Ranks | None = None) -> ArtifactRef | None:
    """Write the training state to `workdir`, log it to run `run_id`, then point the run's tag at it.

    Every rank calls this: each engine writes its state (DeepSpeed: every rank its ZeRO partition of the
    optimizer state, into the same folder; on several nodes each into its own, moved to rank 0's). Rank 0
    then adds the RNG states (the same on every rank, see
    `ranks.share_rollout`), uploads and tags; it returns the reference, the other ranks None.
    `data_position` (problems consumed so far) is recorded for readers; resuming needs only the step,
    since `batch.step_problems` is a pure function of (seed, step).
    """
    ranks = ranks or Ranks()
    folder = workdir / f"step-{step:06d}"
    models.policy_engine.save_state(folder / "policy")
    if models.critic_engine is not None:
        models.critic_engine.save_state(folder / "critic")
    ranks.barrier()  # every rank's files are written
    ranks.move_files_to_main(folder)  # several nodes: their optimizer partitions, into rank 0's folder
    if not ranks.main:
        return None
    torch.save(_torch_rng_states(), folder / "torch_rng.pt")
    (folder / "state.json").write_text(json.dumps({
        "step": step,
        "data_position": data_position,
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": _jsonable(np.random.get_state()),
        "history": history,
    }))
    path = f"checkpoints/step-{step:06d}"
    ref = ArtifactRef(uri=f"runs:/{run_id}/{path}", sha256=sha256_path(folder))
    client = MlflowClient()
    client.log_artifacts(run_id, str(folder), path)
    client.set_tag(run_id, TAG_CHECKPOINT, json.dumps({"step": step, "uri": ref.uri, "sha256": ref.sha256}))
    shutil.rmtree(folder, ignore_errors=True)
    return ref


@dataclass
class Resume:
    """A checkpoint fetched (digest-checked) to `folder`, from run `run_id` at `step`."""

    run_id: str
    step: int
    folder: Path
    ref: ArtifactRef
    """Where it came from (each node of a multi-node stage fetches its own copy)."""


def fetch_resume_point(cfg: Config, run_id: str, experiment_id: str, workdir: Path) -> Resume | None:
    """Tag run `run_id` with its resume key and fetch the newest checkpoint to continue from, if any (run in
    the stage process; the ranks only read the folder)."""
    key = resume_key(cfg)
    found = find_checkpoint(key, experiment_id, run_id) if cfg.resume else None
    MlflowClient().set_tag(run_id, TAG_RESUME_KEY, key)
    if found is None:
        return None
    folder = fetch_verified(found.ref, workdir / f"resume-{found.run_id}")
    return Resume(found.run_id, found.step, folder, found.ref)


def read_history(folder: Path) -> list[dict[str, float]]:
    """The per-step metrics recorded in a checkpoint folder."""
    return json.loads((folder / "state.json").read_text())["history"]


def restore_checkpoint(models: Models, folder: Path) -> tuple[int, list[dict[str, float]]]:
    """Load a fetched checkpoint into `models` and the RNGs (every rank calls it); return (step, history)."""
    models.policy_engine.load_state(folder / "policy")
    if models.critic_engine is not None:
        models.critic_engine.load_state(folder / "critic")
    state = json.loads((folder / "state.json").read_text())
    rng = torch.load(folder / "torch_rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_python_state(state["python_rng"]))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return int(state["step"]), state["history"]


def _torch_rng_states() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _python_state(x: list) -> tuple:
    version, internal, gauss = x
    return version, tuple(internal), gauss
