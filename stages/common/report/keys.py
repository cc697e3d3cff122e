"""MLflow metric names of evaluation results: `eval/<who>/<metric>` on the test split,
`eval/<set>/<who>/<metric>` on other sets, each with `_lo` / `_hi` interval ends. The names are the
MLflow contract that the pipeline run, the registry gate and ablations read."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from stages.common.report.summary import Comparison, Result

#: The eval set whose metrics keep the short names `eval/<model>/<metric>` (the held-out test split).
DEFAULT_SET = "test"


def metric_key(set_name: str, who: str, metric: str) -> str:
    """MLflow metric name: `eval/<who>/<metric>` on the test split, `eval/<set>/<who>/<metric>` elsewhere."""
    return f"eval/{who}/{metric}" if set_name == DEFAULT_SET else f"eval/{set_name}/{who}/{metric}"


def flat_metrics(results: Iterable[Result], comparisons: Iterable[Comparison]) -> dict[str, float]:
    """Every estimate as `<key>` and its interval as `<key>_lo` / `<key>_hi` (keys from `metric_key`).
    Undefined metrics (nan: e.g. a repeat share with no failed episode) are left out."""
    out: dict[str, float] = {}
    rows = [(r.set, r.label, r.metrics) for r in results] + [(c.set, c.label, c.metrics) for c in comparisons]
    for set_name, who, metrics in rows:
        for name, iv in metrics.items():
            if np.isnan(iv.estimate):
                continue
            key = metric_key(set_name, who, name)
            out[key], out[f"{key}_lo"], out[f"{key}_hi"] = iv.estimate, iv.lo, iv.hi
    return out
