"""Data curation: QA datasets (Hugging Face hub or local files, or the synthetic multiplication set) ->
train/val(/test) parquet splits, whole evaluation sets `eval/<name>`, the tables of quarantined,
duplicate and contaminated rows, and a manifest accounting for every row read; all in MLflow.

Sources are declared in the config (see `config.py`): built-in schemas for GSM8K, MATH/MATH-500 and
MetaMathQA, and a generic mapping for any other QA set. Each row is parsed and type-checked by itself;
one that cannot be used goes to quarantine with its reason, file and line/row, and never stops the run.

Launch: python -m stages.curate --config curate.yaml
"""

from __future__ import annotations

from stages.common.contracts import SPLITS, load_split
from stages.curate.config import (
    Config,
    GenericSource,
    GSM8KSource,
    MATHSource,
    MetaMathQASource,
    MultiplicationSource,
    Output,
)

__all__ = ["SPLITS", "Config", "GSM8KSource", "GenericSource", "MATHSource", "MetaMathQASource",
           "MultiplicationSource", "Output", "load_split", "run"]


def run(config: Config, parent_run_id: str | None = None, run_id: str | None = None) -> Output:
    """Curate the configured sources in the stage's MLflow run; return the Output."""
    from stages.common.tracking import run_stage
    from stages.curate.stage import curate

    return run_stage("curate", config, curate, parent_run_id=parent_run_id, run_id=run_id)
