"""Evaluation: every model (SFT, RL, and any MLflow model URI in `models`) on every evaluation set of
the curate Output (the held-out `test` split and each `eval/<name>` set), in one run.

Per model and set: Succ@k (k = 1..T) from multi-turn UFO episodes and the area under that curve,
unbiased Pass@k from n independent single-turn samples, greedy accuracy, average turns (all episodes;
to success among solved), effective answer ratio, invalid rate, the repeat share and all-same share of
failed episodes, conditional self-correction P(solved at k | wrong at k-1) and retry success; each with
a 95% bootstrap interval over problems. The multi-turn metrics come twice when `inference` holds both
conditions: with the feedback turn, and with an empty user turn instead (`<model>_no_feedback`).
Paired differences b - a (same problems, same resamples) for every pair of models and for each model
with vs without feedback. Definitions: stages/common/metrics.py; intervals: stages/common/stats.py.

Logged metric names: `eval/<model>/<metric>` on the test split, `eval/<set>/<model>/<metric>` on the
other sets, `eval/[<set>/]<b>_vs_<a>/<metric>` for differences, `_lo`/`_hi` for interval ends. Also:
`eval/report.html` (one self-contained page: tables with intervals, Succ@k-vs-Pass@k curves, paired
differences, a sample of transcripts with each attempt's grade), `eval/plots/*.png`, `eval/report.json`,
`eval/examples.parquet` (one row per episode; `report.arms_from_examples` rebuilds every metric from
it, which is how seeds are pooled) and one MLflow table per model and set (`eval/tables/<set>/<model>.json`).

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
