"""The evaluation report: results with bootstrap intervals, paired comparisons, PNG plots and one
self-contained HTML page (inline CSS, plots as data URIs), for any list of (model or arm, eval set)
results.

The evaluate stage builds one per pipeline run; an ablation builds one from several arms with seeds
pooled. Both go through the same three steps:

    results, comparisons = summarise_set("test", arms, pairs)          # intervals from per-problem terms
    plots = make_plots(results, comparisons, max_turns)                # {name: PNG bytes}
    html = build_html(results, comparisons, max_turns=T, plots=plots, transcripts=..., meta=...)

Nothing here imports torch or MLflow; matplotlib is imported only to draw.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from stages.common.metrics import EpisodeOutcomes, describe, greedy_terms, multi_turn_terms, pass_at_k_terms
from stages.common.stats import (
    Interval,
    Resampling,
    Terms,
    draw_resamples,
    interval,
    paired_difference,
    stack_seeds,
)

if TYPE_CHECKING:
    import pandas as pd

#: The eval set whose metrics keep the short names `eval/<model>/<metric>` (the held-out test split).
DEFAULT_SET = "test"


@dataclass(frozen=True)
class Arm:
    """One model (or ablation arm) under one inference condition, as per-problem metric terms.

    terms: metric name -> (num, den), arrays [P] or [S, P] (seeds x problems), the same problems in the
    same order for every arm of a set.
    """

    model: str
    feedback: bool
    terms: dict[str, Terms]

    @property
    def label(self) -> str:
        return label(self.model, self.feedback)


def label(model: str, feedback: bool) -> str:
    """`rl` for the model evaluated with feedback at inference, `rl_no_feedback` without."""
    return model if feedback else f"{model}_no_feedback"


@dataclass(frozen=True)
class Result:
    """Every metric of one arm on one eval set, each with its interval."""

    set: str
    model: str
    feedback: bool
    problems: int
    seeds: int
    metrics: dict[str, Interval]

    @property
    def label(self) -> str:
        return label(self.model, self.feedback)


@dataclass(frozen=True)
class Comparison:
    """Paired differences b - a on the same problems (and seeds) of one eval set."""

    set: str
    a: str
    b: str
    metrics: dict[str, Interval]

    @property
    def label(self) -> str:
        return f"{self.b}_vs_{self.a}"


@dataclass(frozen=True)
class Attempt:
    reply: str
    answer: str | None
    correct: bool


@dataclass(frozen=True)
class Transcript:
    """One multi-turn episode, for the report's sample of transcripts."""

    set: str
    label: str
    problem_id: str
    question: str
    gold: str
    feedback_text: str
    attempts: list[Attempt] = field(default_factory=list)


def summarise_set(set_name: str, arms: Sequence[Arm], pairs: Iterable[tuple[str, str]], *, n_boot: int = 2000,
                  level: float = 0.95, seed: int = 0,
                  resampling: Resampling = "problems") -> tuple[list[Result], list[Comparison]]:
    """Intervals for every metric of every arm, and paired differences for each (a, b) label pair.

    One set of resamples serves every arm and metric of the set, so the paired differences are paired.
    """
    shapes = {np.shape(np.atleast_2d(num)) for arm in arms for num, _ in arm.terms.values()}
    if len(shapes) != 1:
        raise ValueError(f"set {set_name!r}: arms were evaluated on different problems/seeds: {sorted(shapes)}")
    n_seeds, n_problems = shapes.pop()
    counts = draw_resamples(n_seeds, n_problems, n_boot=n_boot, seed=seed, resampling=resampling)
    results = [Result(set_name, arm.model, arm.feedback, n_problems, n_seeds,
                      {m: interval(t, counts, level) for m, t in arm.terms.items()}) for arm in arms]
    by_label = {arm.label: arm for arm in arms}
    comparisons = []
    for a, b in pairs:
        if a not in by_label or b not in by_label:
            raise ValueError(f"set {set_name!r}: no arm {a if a not in by_label else b!r} to compare; "
                             f"arms are {sorted(by_label)}")
        shared = [m for m in by_label[b].terms if m in by_label[a].terms]
        comparisons.append(Comparison(set_name, a, b, {
            m: paired_difference(by_label[a].terms[m], by_label[b].terms[m], counts, level) for m in shared}))
    return results, comparisons


def arms_from_examples(per_seed: Sequence[pd.DataFrame], set_name: str, max_turns: int) -> list[Arm]:
    """The arms of one eval set rebuilt from the evaluate stage's `examples` parquet (one row per episode),
    one frame per seed: pooled terms [S, P], problems sorted by id (every seed must hold the same ones).

    This is how runs are pooled: evaluate each seed's models, then
    `summarise_set(set, arms_from_examples([seed0, seed1, seed2], set, T), pairs)`.
    """
    frames = [df[df.set == set_name] for df in per_seed]
    if not len(frames[0]):
        raise ValueError(f"no examples of set {set_name!r}")
    keys = list(dict.fromkeys(zip(frames[0].model, frames[0].feedback, strict=True)))
    arms = []
    for model, shown in keys:
        single_turn_here = shown or (model, True) not in keys  # single-turn metrics do not depend on feedback
        per_seed_terms = []
        ids0 = None
        for i, df in enumerate(frames):
            d = df[(df.model == model) & (df.feedback == shown)].sort_values(["id", "episode"])
            ids = d.id.unique()
            if ids0 is None:
                ids0 = ids
            elif not np.array_equal(ids, ids0):
                raise ValueError(f"set {set_name!r}, {label(model, shown)}: seed {i} holds other problems than seed 0")
            g = int(d.episode.max()) + 1

            def col(c, d=d, g=g):
                return d[c].to_numpy(dtype=np.int64).reshape(-1, g)

            terms = multi_turn_terms(EpisodeOutcomes(col("solved_turn"), col("num_turns"), col("num_valid"),
                                                     col("num_distinct")), max_turns)
            if single_turn_here:
                first = d[d.episode == 0]
                terms |= pass_at_k_terms(first.single_correct.to_numpy(), int(first.num_samples.iloc[0]), max_turns)
                terms |= greedy_terms(first.greedy_correct.to_numpy())
            per_seed_terms.append(terms)
        arms.append(Arm(model, bool(shown), {m: stack_seeds([t[m] for t in per_seed_terms])
                                             for m in per_seed_terms[0]}))
    return arms


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


# --- what to show, in which order ----------------------------------------------------------------------


def metric_order(max_turns: int) -> list[tuple[str, str]]:
    """(metric name, display name) in the report's order."""
    ks = range(1, max_turns + 1)
    return ([(f"succ_at_{k}", f"Succ@{k}") for k in ks] + [("succ_auc", "Succ@k area")]
            + [(f"pass_at_{k}", f"Pass@{k}") for k in ks] + [("greedy_accuracy", "Greedy accuracy")]
            + [("avg_turns", "Average turns"), ("avg_turns_to_success", "Turns to success (solved)"),
               ("effective_answer_ratio", "Effective answer ratio"), ("repeat_share", "Repeat share (failed)"),
               ("all_same_share", "All-same share (failed)")]
            + [(f"self_correction_at_{k}", f"Self-correction @{k} | wrong @{k - 1}") for k in ks if k >= 2]
            + [("retry_success", "Retry success | wrong @1"), ("invalid_rate", "Invalid rate")])


#: Metrics in the paired-difference plot (all are shares, so one axis fits them).
FOREST = ("succ_at_1", "succ_at_{T}", "succ_auc", "pass_at_{T}", "effective_answer_ratio", "repeat_share",
          "self_correction_at_2", "retry_success", "invalid_rate")


#: Metrics where a lower value is the better one (for colouring differences).
LOWER_IS_BETTER = ("avg_turns", "avg_turns_to_success", "invalid_rate", "repeat_share", "all_same_share")


def verdict(name: str, iv: Interval) -> str:
    """`better` / `worse` when the interval of a difference b - a excludes 0 (b better / worse than a on
    metric `name`), else `unclear`."""
    if not iv.excludes(0.0):
        return "unclear"
    return "better" if (iv.lo > 0) != (name in LOWER_IS_BETTER) else "worse"


def _sets(results: Iterable[Result]) -> list[str]:
    return list(dict.fromkeys(r.set for r in results))


# --- plots ------------------------------------------------------------------------------------------------


def make_plots(results: Sequence[Result], comparisons: Sequence[Comparison], max_turns: int) -> dict[str, bytes]:
    """PNG bytes by file name: per set, the Succ@k and Pass@k curves with 95% error bars
    (`curves_<set>.png`) and the paired differences with their intervals (`differences_<set>.png`)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in containers
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    ks = np.arange(1, max_turns + 1)
    for set_name in _sets(results):
        rs = [r for r in results if r.set == set_name]
        series = [(r, "succ", f"{r.label} Succ@k" + ("" if r.feedback else " (no feedback at inference)"))
                  for r in rs] + [(r, "pass", f"{r.model} Pass@k (single-turn samples)")
                                  for r in rs if r.feedback and "pass_at_1" in r.metrics]
        series = [s for s in series if all(f"{s[1]}_at_{k}" in s[0].metrics for k in ks)]
        # The curves on top, and below them a table with every plotted number and its interval.
        fig, (ax, tab) = plt.subplots(2, 1, figsize=(8.5, 4.8 + 0.22 * len(series)),
                                      gridspec_kw={"height_ratios": [4.6, 0.5 + 0.22 * len(series)]})
        width = 0.35 / max(len(series), 1)
        colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r.model for r in rs))}
        cells = []
        for i, (r, kind, name) in enumerate(series):
            iv = [r.metrics[f"{kind}_at_{k}"] for k in ks]
            y = np.array([v.estimate for v in iv])
            err = np.array([[v.estimate - v.lo for v in iv], [v.hi - v.estimate for v in iv]])
            style = {"succ": "-" if r.feedback else ":", "pass": "--"}[kind]
            ax.errorbar(ks + (i - (len(series) - 1) / 2) * width, y, yerr=err, capsize=3, marker="o" if kind == "succ" else "s",
                        linestyle=style, color=colours[r.model], label=name, alpha=0.9 if kind == "succ" else 0.6)
            cells.append([f"{v.estimate:.3f} [{v.lo:.3f}, {v.hi:.3f}]" for v in iv])
        ax.set_xlabel("k (turns for Succ@k, samples for Pass@k)")
        ax.set_ylabel("solved fraction")
        ax.set_xticks(ks)
        ax.set_title(f"{set_name}: Succ@k vs Pass@k, {rs[0].problems} problems x {rs[0].seeds} seed(s), "
                     f"{_level(rs)} bootstrap intervals", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        tab.axis("off")
        if cells:
            table = tab.table(cellText=cells, rowLabels=[f"{r.label} {kind.capitalize()}@k" for r, kind, _ in series],
                              colLabels=[f"k = {k}" for k in ks], loc="center", cellLoc="center")
            table.auto_set_font_size(False)
            table.set_fontsize(6.5)
        plots[f"curves_{set_name}.png"] = _png(fig, plt)

        cs = [c for c in comparisons if c.set == set_name]
        if not cs:
            continue
        names = [n.replace("{T}", str(max_turns)) for n in FOREST]
        rows = [(c, n) for c in cs for n in names if n in c.metrics and not np.isnan(c.metrics[n].estimate)]
        fig, ax = plt.subplots(figsize=(7.5, 0.28 * len(rows) + 1.2))
        for y, (c, n) in enumerate(reversed(rows)):
            iv = c.metrics[n]
            colour = {"better": "tab:green", "worse": "tab:red", "unclear": "tab:gray"}[verdict(n, iv)]
            ax.errorbar([iv.estimate], [y], xerr=[[iv.estimate - iv.lo], [iv.hi - iv.estimate]], fmt="o",
                        color=colour, capsize=3)
            ax.annotate(f"{iv.estimate:+.3f} [{iv.lo:+.3f}, {iv.hi:+.3f}]", (iv.hi, y), xytext=(6, -3),
                        textcoords="offset points", fontsize=7)
        ax.set_yticks(range(len(rows)), [f"{c.b} − {c.a}: {n}" for c, n in reversed(rows)], fontsize=7)
        ax.axvline(0, color="black", linewidth=0.8)
        lo = min(c.metrics[n].lo for c, n in rows)
        hi = max(c.metrics[n].hi for c, n in rows)
        ax.set_xlim(min(lo, 0) - 0.02, max(hi, 0) + 0.25 * (max(hi, 0) - min(lo, 0)) + 0.05)
        ax.set_xlabel(f"paired difference (b − a), {_level(cs)} bootstrap interval over problems")
        ax.set_title(f"{set_name}: paired differences (green/red: b better/worse than a, interval excludes 0)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        plots[f"differences_{set_name}.png"] = _png(fig, plt)
    return plots


def _level(items) -> str:
    first = next(iter(next(iter(items)).metrics.values()))
    return f"{first.level:.0%}"


def _png(fig, plt) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- HTML -------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#1d1d1f;font-size:14px;line-height:1.4;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin-top:20px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
th{background:#f4f4f6;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ci{color:#6e6e73;font-size:12px}.better{background:#e3f5e1}.worse{background:#fbe3e1}
.meta td{border:none;padding:1px 10px 1px 0}.meta td:first-child{white-space:nowrap}.note{color:#555;font-size:13px}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.tr{border:1px solid #ddd;border-radius:6px;padding:6px 10px;margin:6px 0;background:#fcfcfd}
.turn{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;margin:2px 0}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.inv{color:#8a6d00;font-weight:600}
.fb{color:#6e6e73;font-style:italic}.wide{overflow-x:auto}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:8px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _cell(iv: Interval | None, signed: bool = False, name: str | None = None) -> str:
    """A number over its interval; a difference (name given) is shaded by its verdict."""
    if iv is None:
        return '<td class="num">—</td>'
    if np.isnan(iv.estimate):
        return '<td class="num">n/a</td>'
    f = "{:+.3f}" if signed else "{:.3f}"
    cls = "num"
    if name is not None and verdict(name, iv) != "unclear":
        cls += f" {verdict(name, iv)}"
    return (f'<td class="{cls}">{f.format(iv.estimate)}<br><span class="ci">[{f.format(iv.lo)}, '
            f'{f.format(iv.hi)}]</span></td>')


def _table(order: list[tuple[str, str]], columns: list[tuple[str, dict[str, Interval], bool]]) -> str:
    """Metrics as rows, one column per (header, metrics, is a difference); scrolls sideways when wide."""
    rows = []
    for name, shown in order:
        if any(name in metrics for _, metrics, _ in columns):
            rows.append(f"<tr><td title='{_e(describe(name))}'>{_e(shown)}</td>" + "".join(
                _cell(metrics.get(name), signed=diff, name=name if diff else None) for _, metrics, diff in columns) + "</tr>")
    head = "<tr><th>metric</th>" + "".join(f"<th>{_e(h)}</th>" for h, _, _ in columns) + "</tr>"
    return f"<div class='wide'><table>{head}{''.join(rows)}</table></div>"


def _img(name: str, png: bytes) -> str:
    return f'<img alt="{_e(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def build_html(results: Sequence[Result], comparisons: Sequence[Comparison], *, max_turns: int,
               title: str = "UFO evaluation report", plots: dict[str, bytes] | None = None,
               transcripts: Sequence[Transcript] = (), meta: dict[str, str] | None = None,
               notes: Sequence[str] = ()) -> str:
    """The whole report as one HTML string: no external file, script, font or stylesheet.

    meta: key -> value lines at the top (runs, protocol, ...); notes: paragraphs of plain text after them
    (e.g. an ablation's reading of its findings)."""
    plots = plots or {}
    order = metric_order(max_turns)
    level = _level(results) if results else "95%"
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"]
    if meta:
        out.append("<table class='meta'>" + "".join(f"<tr><td><b>{_e(k)}</b></td><td>{_e(v)}</td></tr>"
                                                    for k, v in meta.items()) + "</table>")
    out += [f"<p>{_e(n)}</p>" for n in notes]
    out.append(f"<p class='note'>Every number is a point estimate with its {level} bootstrap percentile "
               "interval below it; the bootstrap resamples problems. Differences b − a are paired: both sides "
               "are computed on the same resampled problems. Green/red: b is better/worse than a (the interval "
               "excludes 0; lower is better for turns, invalid rate, repeat and all-same shares). Hover a metric's name for its definition (also listed at the end).</p>")
    for set_name in _sets(results):
        rs = [r for r in results if r.set == set_name]
        cs = [c for c in comparisons if c.set == set_name]
        out.append(f"<h2>Eval set <code>{_e(set_name)}</code>: {rs[0].problems} problems, {rs[0].seeds} seed(s)</h2>")
        columns = [(r.label, r.metrics, False) for r in rs] + [(f"{c.b} − {c.a}", c.metrics, True) for c in cs]
        if len(columns) <= 8:  # fits a 1280-pixel page: results and differences side by side
            out.append(_table(order, columns))
        else:
            out.append(_table(order, columns[: len(rs)]) + "<h3>Paired differences</h3>" + _table(order, columns[len(rs):]))
        for kind in ("curves", "differences"):
            name = f"{kind}_{set_name}.png"
            if name in plots:
                out.append(_img(name, plots[name]))
        ts = [t for t in transcripts if t.set == set_name]
        if ts:
            out.append(f"<h3>Sample of multi-turn transcripts ({len(dict.fromkeys(t.problem_id for t in ts))} "
                       "problems; ✓ correct, ✗ wrong, ∅ no readable answer)</h3>")
            for pid in dict.fromkeys(t.problem_id for t in ts):
                group = [t for t in ts if t.problem_id == pid]
                out.append(f"<div class='tr'><b>{_e(pid)}</b>: {_e(group[0].question)} "
                           f"&nbsp; gold <code>{_e(group[0].gold)}</code><div class='grid'>")
                for t in group:
                    out.append(f"<div><b>{_e(t.label)}</b>")
                    for i, a in enumerate(t.attempts):
                        mark = ("<span class='ok'>✓</span>" if a.correct else "<span class='inv'>∅</span>"
                                if a.answer is None else "<span class='bad'>✗</span>")
                        if i:
                            out.append(f"<div class='turn fb'>user: {_e(t.feedback_text) or '(empty turn)'}</div>")
                        out.append(f"<div class='turn'>{i + 1}. {mark} {_e(a.reply)!s} "
                                   f"<span class='ci'>→ {_e(a.answer)}</span></div>")
                    out.append("</div>")
                out.append("</div></div>")
    out.append("<h2>Metrics</h2><table>" + "".join(
        f"<tr><td>{_e(shown)}</td><td><code>{_e(name)}</code></td><td>{_e(describe(name))}</td></tr>"
        for name, shown in order) + "</table></body></html>")
    return "".join(out)
