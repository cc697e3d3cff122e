"""Evaluation: the SFT and RL models side by side on the held-out test split.

Per model: Succ@k (k = 1..T) from one multi-turn UFO episode per problem, Pass@k (k = 1..T) from n
independent single-turn samples (unbiased estimator), average turns, effective answer ratio, invalid
rate and greedy accuracy, logged as `eval/<model>/<metric>`; a PNG of the curves; a per-example table
of every attempt.

Launch: python -m stages.evaluate --config evaluate.yaml   (its data/sft/rl fields hold upstream Outputs)
"""

from __future__ import annotations

from stages.evaluate.config import Config, Output

__all__ = ["Config", "Output", "run"]


def run(config: Config, parent_run_id: str | None = None, run_id: str | None = None) -> Output:
    """Evaluate the given models in the stage's MLflow run; return the Output."""
    from stages.common.tracking import run_stage
    from stages.evaluate.stage import evaluate

    return run_stage("evaluate", config, evaluate, parent_run_id=parent_run_id, run_id=run_id)
