"""One rank of a multi-process RL run: `python -m stages.rl.rank JOB.json`, started by torchrun or the
deepspeed launcher that the RL stage launches (never by hand). JOB.json holds the stage's config, the
verified local paths of its train split, the SFT model and the checkpoint to resume from (if any), its
MLflow run id and the output folder.

Rank 0 logs the per-step metrics and the checkpoints into the stage's MLflow run (which the stage process
keeps open) and writes `result.json` next to JOB.json; the stage process logs the model and the Output, once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from stages.common.engine import die_with_parent
from stages.common.runtime import prepare_process


def main(job_path: str) -> int:
    die_with_parent()
    prepare_process()
    import mlflow
    import torch
    from mlflow.entities import Metric

    from stages.common.runtime import set_cpu_threads
    from stages.common.tracking import write_json_atomic
    from stages.rl.config import Config
    from stages.rl.stage import fit

    set_cpu_threads()
    job = json.loads(Path(job_path).read_text())
    config = Config.model_validate(job["config"])
    client = mlflow.MlflowClient()

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(job["run_id"], metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    resume = Path(job["resume"]) if job["resume"] else None
    result = fit(config, Path(job["problems"]), Path(job["model_dir"]), resume, job["run_id"], Path(job["out_dir"]),
                 log_metrics)
    if torch.distributed.get_rank() == 0:
        write_json_atomic(Path(job_path).with_name("result.json"), result)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    sys.exit(main(sys.argv[1]))
