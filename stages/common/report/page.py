"""The report as one self-contained HTML page (inline CSS, plots as data URIs): a table per eval set
with every number over its interval, differences shaded by their verdict, the plots, a sample of
multi-turn transcripts and the metric definitions."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stages.common.metrics import describe
from stages.common.report.summary import Comparison, Result, level_text, metric_order, set_names, verdict
from stages.common.stats import Interval


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
    level = level_text(results) if results else "95%"
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
    for set_name in set_names(results):
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
