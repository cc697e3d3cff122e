"""One rank of a multi-process SFT run: `python -m stages.sft.rank JOB.json`, started by torchrun or the
deepspeed launcher that the SFT stage launches (never by hand). JOB.json holds the stage's config, the
verified local paths of its data splits, its MLflow run id and the output folder.

Rank 0 logs the per-step metrics into the stage's MLflow run (which the stage process keeps open) and
writes `result.json` next to JOB.json; the stage process logs the artifacts and the Output, once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from stages.common.engine import die_with_parent
from stages.common.runtime import prepare_process


def main(job_path: str) -> int:
    die_with_parent()
    prepare_process()
    import mlflow
    import torch
    from mlflow.entities import Metric

    from stages.common.contracts import load_split
    from stages.common.tracking import write_json_atomic
    from stages.sft.config import Config
    from stages.sft.stage import fit

    job = json.loads(Path(job_path).read_text())
    config = Config.model_validate(job["config"])
    client = mlflow.MlflowClient()

    def log_metrics(metrics: dict[str, float], step: int | None) -> None:
        import time

        now = int(time.time() * 1000)
        client.log_batch(job["run_id"], metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    base_dir = Path(job["base_dir"]) if job.get("base_dir") else None
    metrics = fit(config, load_split(job["train"]), load_split(job["val"]), Path(job["out_dir"]), log_metrics,
                  base_dir)
    if torch.distributed.get_rank() == 0:
        write_json_atomic(Path(job_path).with_name("result.json"), metrics)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    sys.exit(main(sys.argv[1]))
