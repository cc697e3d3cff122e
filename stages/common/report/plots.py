"""PNG plots of evaluation results: per set, Succ@k and Pass@k curves with their intervals, and the
paired differences as a forest plot. matplotlib is imported only to draw."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from stages.common.report.summary import FOREST, Comparison, Result, level_text, set_names, verdict


def make_plots(results: Sequence[Result], comparisons: Sequence[Comparison], max_turns: int) -> dict[str, bytes]:
    """PNG bytes by file name: per set, the Succ@k and Pass@k curves with 95% error bars
    (`curves_<set>.png`) and the paired differences with their intervals (`differences_<set>.png`)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in containers
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    ks = np.arange(1, max_turns + 1)
    for set_name in set_names(results):
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
                     f"{level_text(rs)} bootstrap intervals", fontsize=9)
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
        ax.set_xlabel(f"paired difference (b − a), {level_text(cs)} bootstrap interval over problems")
        ax.set_title(f"{set_name}: paired differences (green/red: b better/worse than a, interval excludes 0)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        plots[f"differences_{set_name}.png"] = _png(fig, plt)
    return plots


def _png(fig, plt) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
