"""RL checkpoints in the stage's MLflow run, and resuming from them.

A checkpoint is a folder logged to the run as `checkpoints/step-NNNNNN/`: the policy and critic
weights (safetensors), both optimizers' states, every RNG state, the step (the data position follows
from it, see `batch.step_problems`) and the metric history. Only after the upload completes does the
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

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_model, save_model

from stages.common.contracts import ArtifactRef
from stages.common.tracking import fetch_verified, log_artifact
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
                    workdir: Path) -> ArtifactRef:
    """Write the training state to `workdir`, log it to the active run, then point the tag at it.

    `data_position` (problems consumed so far) is recorded for readers; resuming needs only the step,
    since `batch.step_problems` is a pure function of (seed, step).
    """
    folder = workdir / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_model(models.policy, str(folder / "policy.safetensors"))
    optim = {"policy": models.policy_optimizer.state_dict()}
    if models.critic is not None:
        save_model(models.critic, str(folder / "critic.safetensors"))
        optim["critic"] = models.critic_optimizer.state_dict()
    torch.save(optim, folder / "optimizers.pt")
    torch.save(_torch_rng_states(), folder / "torch_rng.pt")
    (folder / "state.json").write_text(json.dumps({
        "step": step,
        "data_position": data_position,
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": _jsonable(np.random.get_state()),
        "history": history,
    }))
    ref = log_artifact(folder, f"checkpoints/step-{step:06d}")
    mlflow.set_tag(TAG_CHECKPOINT, json.dumps({"step": step, "uri": ref.uri, "sha256": ref.sha256}))
    shutil.rmtree(folder, ignore_errors=True)
    return ref


def restore_checkpoint(models: Models, found: Found, workdir: Path) -> tuple[int, list[dict[str, float]]]:
    """Load a checkpoint (digest-checked) into `models` and the RNGs; return (step, metric history)."""
    folder = fetch_verified(found.ref, workdir / f"resume-{found.run_id}")
    load_model(models.policy, str(folder / "policy.safetensors"))
    optim = torch.load(folder / "optimizers.pt", weights_only=True)
    models.policy_optimizer.load_state_dict(optim["policy"])
    if models.critic is not None:
        load_model(models.critic, str(folder / "critic.safetensors"))
        models.critic_optimizer.load_state_dict(optim["critic"])
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
