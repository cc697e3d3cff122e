"""The evaluation report: results with bootstrap intervals, paired comparisons, PNG plots and one
self-contained HTML page (inline CSS, plots as data URIs), for any list of (model or arm, eval set)
results.

The evaluate stage builds one per pipeline run; an ablation builds one from several arms with seeds
pooled. Both go through the same three steps:

    results, comparisons = summarise_set("test", arms, pairs)          # intervals from per-problem terms
    plots = make_plots(results, comparisons, max_turns)                # {name: PNG bytes}
    html = build_html(results, comparisons, max_turns=T, plots=plots, transcripts=..., meta=...)

and log the numbers under the names `flat_metrics` gives them. One module per job:

    summary.py   results, comparisons and their intervals; what is shown in which order and colour
    keys.py      the MLflow metric names (the contract the pipeline, the registry gate and ablations read)
    plots.py     the PNG plots
    page.py      the HTML page, transcripts included

Nothing here imports torch or MLflow; matplotlib is imported only to draw.
"""

from stages.common.report.keys import DEFAULT_SET, flat_metrics, metric_key
from stages.common.report.page import Attempt, Transcript, build_html
from stages.common.report.plots import make_plots
from stages.common.report.summary import (
    FOREST,
    LOWER_IS_BETTER,
    Arm,
    Comparison,
    Result,
    arms_from_examples,
    label,
    metric_order,
    summarise_set,
    verdict,
)

__all__ = ["DEFAULT_SET", "FOREST", "LOWER_IS_BETTER", "Arm", "Attempt", "Comparison", "Result", "Transcript",
           "arms_from_examples", "build_html", "flat_metrics", "label", "make_plots", "metric_key", "metric_order",
           "summarise_set", "verdict"]
