"""A stage's training on several data-parallel ranks (engine.kind=deepspeed), both sides of it.

The stage process calls `run_on_ranks`: it writes JOB.json into its work folder and launches
`engine.num_processes` ranks of

    python -m stages.common.rank MODULE:FUNCTION JOB.json

under torchrun or the deepspeed launcher, then waits for them. Each rank (never started by hand) calls
`FUNCTION(job, log_metrics)` with the JOB.json dict; rank 0's return value comes back to the stage as
`result.json` next to JOB.json. `log_metrics` logs into the stage's MLflow run `job["run_id"]` (which
the stage process keeps open), on rank 0 only by the training loops' own rule. The stage process alone
logs the artifacts and the Output, once. SFT (`stages.sft.stage:fit_rank`) and RL
(`stages.rl.stage:fit_rank`) run through here; how the ranks share a step is stages/common/ranks.py.

Several nodes (engine.nodes > 1; one container or pod per node, each started by its launcher with the
same stage command and `UFO_NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT` set):
- Node 0 runs the stage as on one machine and hosts the rendezvous; its local ranks are ranks 0 to
  num_processes - 1, so rank 0 (which writes the model and result.json) is on node 0. It also
  publishes its job into the stage's MLflow run (`ranks/job.json`, with the input artifacts' refs).
- Every other node runs no stage body (`follow`): it reads that job from the run, fetches the inputs
  itself (digest-checked: the nodes share no disk) and launches its local ranks into the same
  rendezvous. It never writes to the run. The job's `out_dir` is node-local: rank 0's is the stage's;
  the others' hold what their ranks write (DeepSpeed's optimizer partitions, which checkpoints move to
  rank 0, `Ranks.move_files_to_main`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.processes import (
    DEFAULT_MASTER_PORT,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NODE_RANK_ENV,
    die_with_parent,
    free_port,
    spawn,
    watch,
)
from stages.common.runtime import check_stop, cpu_budget, prepare_process

if TYPE_CHECKING:
    from stages.common.contracts import ArtifactRef
    from stages.common.model_spec import EngineConfig

#: Where node 0 publishes its job in the stage's MLflow run, for the other nodes.
JOB_ARTIFACT = "ranks/job.json"
#: How often a node other than 0 looks for that job.
FOLLOW_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Node:
    """This machine's place among the stage's nodes, and where the rendezvous is (on node 0)."""

    count: int
    rank: int
    master_addr: str
    master_port: int

    @classmethod
    def of(cls, spec: EngineConfig) -> Node:
        """One node: this machine, a free port. Several: what the launcher set in the environment."""
        if spec.nodes == 1:
            return cls(1, 0, "127.0.0.1", free_port())
        missing = [k for k in (NODE_RANK_ENV, MASTER_ADDR_ENV) if not os.environ.get(k)]
        if missing:
            raise RuntimeError(f"engine.nodes is {spec.nodes} but {' and '.join(missing)} are not set: a stage on "
                               "several nodes is started by its launcher (flow.<stage>.resources.nodes), which sets "
                               "them on every node")
        rank = int(os.environ[NODE_RANK_ENV])
        if not 0 <= rank < spec.nodes:
            raise RuntimeError(f"{NODE_RANK_ENV}={rank} is not a node of engine.nodes = {spec.nodes}")
        port = int(os.environ.get(MASTER_PORT_ENV) or DEFAULT_MASTER_PORT)
        return cls(spec.nodes, rank, os.environ[MASTER_ADDR_ENV], port)


def this_node_rank() -> int:
    """This process's node (0 where the stage runs on one machine)."""
    return int(os.environ.get(NODE_RANK_ENV) or 0)


def launch_command(spec: EngineConfig, module: str, args: list[str], node: Node, folder: Path) -> list[str]:
    """The command that starts this node's `spec.num_processes` ranks of `python -m module args`.

    Global ranks are node.rank * num_processes + local rank under both launchers, so rank 0 is on node 0.
    torchrun uses its static rendezvous, hosted by node 0 at the master address: its c10d rendezvous
    ignores --node-rank and orders nodes by host name. The deepspeed launcher runs without ssh from a
    hostfile (written to `folder`) that only counts each node's slots.
    """
    n = spec.num_processes
    if spec.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--nnodes", str(node.count),
                "--node_rank", str(node.rank), "--master_addr", node.master_addr, "--master_port",
                str(node.master_port), "-m", module, *args]
    # The deepspeed launcher counts GPUs; on a CPU-only machine --num_gpus still sets the rank count.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
           str(node.master_port)]
    if node.count > 1:
        hostfile = folder / "hostfile"
        hostfile.write_text("".join(f"node-{k} slots={n}\n" for k in range(node.count)))
        cmd += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node.rank), "--master_addr",
                node.master_addr]
    return [*cmd, "--no_local_rank", "--module", module, *args]  # ranks read LOCAL_RANK from the environment


def launch_ranks(spec: EngineConfig, module: str, args: list[str], node: Node, folder: Path, *,
                 grace_seconds: float = 10.0) -> int:
    """Run this node's ranks to completion from the stage process; return the launcher's exit code.

    The launcher stays in the stage's process group (so the flow's group kill reaches every rank), shares
    its output and dies with it (`spawn`). If the stage is interrupted (KeyboardInterrupt, or `Terminated`
    from SIGTERM) while waiting, `watch` stops the launcher (SIGTERM, which torchrun and the deepspeed
    launcher forward to their ranks, then SIGKILL after the grace) and the interrupt propagates.
    """
    threads = max(1, int(os.environ.get("UFO_THREADS") or cpu_budget()) // spec.num_processes)
    env = {**os.environ, "UFO_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), NODE_RANK_ENV: str(node.rank)}
    env.setdefault("PYTHONUNBUFFERED", "1")
    launcher = spawn(launch_command(spec, module, args, node, folder), env=env, output=None, new_session=False)
    return watch(launcher, print, timeout_seconds=None, grace_seconds=grace_seconds).returncode


def run_on_ranks(stage: str, spec: EngineConfig, target: str, job: dict, folder: Path,
                 inputs: dict[str, ArtifactRef] | None = None) -> dict:
    """Launch this node's ranks, which with the other nodes' run `target` ("module:function") on `job`, and
    wait; return rank 0's result (written to `folder`, beside the job).

    Args:
        job: must hold "run_id", the MLflow run the ranks log metrics into, and "out_dir" (see the module doc).
        inputs: the job's entries that hold the local path of a fetched artifact, with that artifact: the
            other nodes fetch their own copies (only read with engine.nodes > 1).
    """
    from stages.common.tracking import write_json_atomic

    node = Node.of(spec)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "job.json", job)
    result = folder / "result.json"
    result.unlink(missing_ok=True)
    if node.count > 1:
        _publish(job, target, inputs or {})
    logging.getLogger(f"ufo.{stage}").info("launching %d rank(s) with %s on node %d of %d", spec.num_processes,
                                           spec.launcher, node.rank, node.count)
    code = launch_ranks(spec, "stages.common.rank", [target, str(folder / "job.json")], node, folder)
    if code != 0 or not result.is_file():
        raise RuntimeError(f"{stage} ranks failed (launcher exit code {code}); see the ranks' output above")
    return json.loads(result.read_text())


def _publish(job: dict, target: str, inputs: dict[str, ArtifactRef]) -> None:
    from mlflow.tracking import MlflowClient

    payload = {"target": target, "job": job, "inputs": {k: ref.model_dump(mode="json") for k, ref in inputs.items()}}
    MlflowClient().log_dict(job["run_id"], payload, JOB_ARTIFACT)


def follow(stage: str, spec: EngineConfig, run_id: str, folder: Path) -> int:
    """A node other than 0: wait for node 0's job in run `run_id`, fetch its inputs into `folder` and run this
    node's ranks of it; return the rank launcher's exit code. Reads the run, never writes to it."""
    from mlflow.tracking import MlflowClient

    from stages.common.contracts import ArtifactRef
    from stages.common.tracking import fetch_verified, write_json_atomic

    node = Node.of(spec)
    log = logging.getLogger(f"ufo.{stage}")
    log.info("node %d of %d: waiting for node 0's job in run %s", node.rank, node.count, run_id)
    client = MlflowClient()
    while not client.list_artifacts(run_id, JOB_ARTIFACT.rpartition("/")[0]):
        status = client.get_run(run_id).info.status
        if status != "RUNNING":
            raise RuntimeError(f"run {run_id} is {status}: node 0's stage ended before it handed out its job")
        check_stop()
        time.sleep(FOLLOW_POLL_SECONDS)
    payload = json.loads(Path(client.download_artifacts(run_id, JOB_ARTIFACT, str(folder))).read_text())
    job = dict(payload["job"], out_dir=str(folder / "out"))
    for key, ref in payload["inputs"].items():
        job[key] = str(fetch_verified(ArtifactRef.model_validate(ref), folder / "in" / key))
    write_json_atomic(folder / "job.json", job)
    log.info("node %d of %d: launching %d rank(s) with %s", node.rank, node.count, spec.num_processes, spec.launcher)
    return launch_ranks(spec, "stages.common.rank", [payload["target"], str(folder / "job.json")], node, folder)


def follow_stage(stage: str, config, run_id: str | None) -> int:
    """What `python -m stages.<stage>` does on a node other than 0 (`UFO_NODE_RANK` > 0): `follow` node
    0's job in run `run_id`, from a scratch folder of its own; return the exit code of this node's ranks."""
    import tempfile

    import mlflow

    from stages.common.config import ConfigError
    from stages.common.workspace import tracking_uri

    spec = getattr(config, "engine", None)
    if spec is None or spec.nodes == 1:
        raise ConfigError(f"{NODE_RANK_ENV}={this_node_rank()}: the {stage} stage runs on one node "
                          f"({stage}.engine.nodes is 1, or it has no ranks)")
    if not run_id:
        raise ConfigError("--run-id: a node other than 0 follows node 0's MLflow run, which it must be given")
    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory(prefix=f"ufo-{stage}-node{this_node_rank()}-") as tmp:
        code = follow(stage, spec, run_id, Path(tmp))
    if code != 0:
        print(f"{stage}: node {this_node_rank()}: ranks failed (launcher exit code {code})", file=sys.stderr)
    return code


def main(target: str, job_path: str) -> int:
    """One rank: run `target` on the job, rank 0 writes its result (see the module doc)."""
    die_with_parent()
    prepare_process()
    import mlflow
    import torch
    from mlflow.entities import Metric

    from stages.common.runtime import set_cpu_threads
    from stages.common.tracking import write_json_atomic

    set_cpu_threads()
    job = json.loads(Path(job_path).read_text())
    module, _, function = target.partition(":")
    fit = getattr(importlib.import_module(module), function)
    client = mlflow.MlflowClient()

    def log_metrics(metrics: dict[str, float], step: int | None) -> None:
        now = int(time.time() * 1000)
        client.log_batch(job["run_id"], metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    result = fit(job, log_metrics)
    if torch.distributed.get_rank() == 0:
        write_json_atomic(Path(job_path).with_name("result.json"), result)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    sys.exit(main(*sys.argv[1:]))
