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
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.processes import die_with_parent, free_port, spawn, watch
from stages.common.runtime import cpu_budget, prepare_process

if TYPE_CHECKING:
    from stages.common.model_spec import EngineConfig


def launch_command(spec: EngineConfig, module: str, args: list[str]) -> list[str]:
    """The command that starts `spec.num_processes` ranks of `python -m module args` on this machine."""
    n, port = spec.num_processes, str(free_port())
    if spec.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", port, "-m", module, *args]
    # The deepspeed launcher counts GPUs; on a CPU-only machine --num_gpus still sets the rank count.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", port,
            "--no_local_rank", "--module", module, *args]  # ranks read LOCAL_RANK from the environment


def launch_ranks(spec: EngineConfig, module: str, args: list[str], *, env: dict[str, str] | None = None,
                 grace_seconds: float = 10.0) -> int:
    """Run the ranks to completion from the stage process; return the launcher's exit code.

    The launcher stays in the stage's process group (so the flow's group kill reaches every rank), shares
    its output and dies with it (`spawn`). If the stage is interrupted (KeyboardInterrupt, or `Terminated`
    from SIGTERM) while waiting, `watch` stops the launcher (SIGTERM, which torchrun and the deepspeed
    launcher forward to their ranks, then SIGKILL after the grace) and the interrupt propagates.
    """
    threads = max(1, int(os.environ.get("UFO_THREADS") or cpu_budget()) // spec.num_processes)
    env = {**os.environ, **(env or {}), "UFO_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    env.setdefault("PYTHONUNBUFFERED", "1")
    launcher = spawn(launch_command(spec, module, args), env=env, output=None, new_session=False)
    return watch(launcher, print, timeout_seconds=None, grace_seconds=grace_seconds).returncode


def run_on_ranks(stage: str, spec: EngineConfig, target: str, job: dict, folder: Path) -> dict:
    """Launch `spec.num_processes` ranks that each run `target` ("module:function") on `job` and wait;
    return rank 0's result (written to `folder`, beside the job). `job` must hold "run_id", the MLflow run
    the ranks log metrics into."""
    from stages.common.tracking import write_json_atomic

    write_json_atomic(folder / "job.json", job)
    result = folder / "result.json"
    result.unlink(missing_ok=True)
    logging.getLogger(f"ufo.{stage}").info("launching %d rank(s) with %s", spec.num_processes, spec.launcher)
    code = launch_ranks(spec, "stages.common.rank", [target, str(folder / "job.json")])
    if code != 0 or not result.is_file():
        raise RuntimeError(f"{stage} ranks failed (launcher exit code {code}); see the ranks' output above")
    return json.loads(result.read_text())


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
