"""Data curation: (question, final answer) datasets -> train/val/test parquet + manifest, in MLflow.

Sources: a seeded synthetic multiplication generator (the tiny default) and GSM8K jsonl files. Every
row is normalised to one schema (id, question, answer, source). Rows that cannot be used go to a
quarantine file with the reason, duplicates are dropped, and any train/val question that also appears
in test is removed (decontamination by normalised text).

Launch: python -m stages.curate --config curate.yaml
"""

from __future__ import annotations

from stages.common.contracts import SPLITS, load_split
from stages.curate.config import Config, GSM8KSource, MultiplicationSource, Output

__all__ = ["SPLITS", "Config", "GSM8KSource", "MultiplicationSource", "Output", "load_split", "run"]


def run(config: Config, parent_run_id: str | None = None, run_id: str | None = None) -> Output:
    """Curate the configured sources in the stage's MLflow run; return the Output."""
    from stages.common.tracking import run_stage
    from stages.curate.stage import curate

    return run_stage("curate", config, curate, parent_run_id=parent_run_id, run_id=run_id)
