"""The report builder of stages/common/report.py on synthetic arms: intervals and paired differences
from per-problem terms, pooling seeds from per-episode tables, metric names, the plots and the
self-contained HTML showing every number with its interval."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from stages.common import report as rep
from stages.common.metrics import EpisodeOutcomes, greedy_terms, multi_turn_terms, pass_at_k_terms
from stages.common.stats import Interval

T = 3


def synthetic_arm(model: str, feedback: bool, solve_rate: float, seed: int, problems: int = 60) -> rep.Arm:
    rng = np.random.default_rng(seed)
    solved = rng.random(problems) < solve_rate
    turn = np.where(solved, rng.integers(0, T, problems), -1)[:, None]  # [P, 1]
    turns = np.where(turn >= 0, turn + 1, T)
    valid = turns - rng.integers(0, 2, (problems, 1)) * (turns > 1)
    outcomes = EpisodeOutcomes(turn, turns, valid, np.minimum(valid, rng.integers(1, T + 1, (problems, 1))))
    terms = multi_turn_terms(outcomes, T)
    if feedback:
        terms |= pass_at_k_terms(rng.integers(0, 6, problems), 5, T) | greedy_terms(rng.integers(0, 2, problems))
    return rep.Arm(model, feedback, terms)


@pytest.fixture(scope="module")
def summary():
    arms = [synthetic_arm("sft", True, 0.4, 0), synthetic_arm("rl", True, 0.6, 1),
            synthetic_arm("rl", False, 0.5, 2)]
    pairs = [("sft", "rl"), ("rl_no_feedback", "rl")]
    results, comparisons = rep.summarise_set("test", arms, pairs, n_boot=300, seed=0)
    more, more_c = rep.summarise_set("gsm8k", arms[:2], [("sft", "rl")], n_boot=300, seed=0)
    return arms, results + more, comparisons + more_c


def test_every_metric_has_an_interval_around_its_estimate(summary):
    arms, results, comparisons = summary
    assert [r.label for r in results] == ["sft", "rl", "rl_no_feedback", "sft", "rl"]
    for r, arm in zip(results[:3], arms, strict=True):
        assert set(r.metrics) == set(arm.terms)
        for iv in r.metrics.values():
            assert np.isnan(iv.estimate) or iv.lo <= iv.estimate <= iv.hi
    (rl_vs_sft, fb_vs_nofb, _) = comparisons
    assert rl_vs_sft.label == "rl_vs_sft" and "pass_at_1" in rl_vs_sft.metrics
    assert "pass_at_1" not in fb_vs_nofb.metrics  # only metrics both arms have
    by = {r.label: r for r in results[:3]}
    d = rl_vs_sft.metrics["succ_at_3"]
    assert d.estimate == pytest.approx(by["rl"].metrics["succ_at_3"].estimate - by["sft"].metrics["succ_at_3"].estimate)


def test_metric_names(summary):
    _, results, comparisons = summary
    flat = rep.flat_metrics(results, comparisons)
    assert flat["eval/rl/succ_at_1"] == results[1].metrics["succ_at_1"].estimate
    assert flat["eval/rl/succ_at_1_lo"] == results[1].metrics["succ_at_1"].lo
    assert "eval/gsm8k/sft/pass_at_3_hi" in flat and "eval/rl_no_feedback/repeat_share" in flat
    assert "eval/rl_vs_rl_no_feedback/effective_answer_ratio" in flat and "eval/gsm8k/rl_vs_sft/succ_auc" in flat
    assert not any(np.isnan(v) for v in flat.values())


def test_undefined_metrics_are_left_out_of_the_logged_names():
    never_fails = rep.Arm("m", True, {"repeat_share": (np.zeros(4), np.zeros(4)), "succ_at_1": (np.ones(4), np.ones(4))})
    results, _ = rep.summarise_set("test", [never_fails], [], n_boot=100)
    assert set(rep.flat_metrics(results, [])) == {"eval/m/succ_at_1", "eval/m/succ_at_1_lo", "eval/m/succ_at_1_hi"}


def test_summarise_refuses_arms_on_different_problems_and_unknown_pairs():
    a, b = synthetic_arm("a", True, 0.5, 0, problems=10), synthetic_arm("b", True, 0.5, 0, problems=12)
    with pytest.raises(ValueError, match="different problems"):
        rep.summarise_set("test", [a, b], [])
    with pytest.raises(ValueError, match="no arm 'c' to compare"):
        rep.summarise_set("test", [a], [("a", "c")])


class _Page(HTMLParser):
    """Collects the cells of every table and the src of every image."""

    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self.srcs: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self._cell = []
        if tag in ("img", "script", "link"):
            self.srcs.append(dict(attrs).get("src") or dict(attrs).get("href") or "")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_html_shows_every_number_with_its_interval_and_is_self_contained(summary):
    _, results, comparisons = summary
    plots = rep.make_plots(results, comparisons, T)
    assert sorted(plots) == ["curves_gsm8k.png", "curves_test.png", "differences_gsm8k.png", "differences_test.png"]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in plots.values())
    transcripts = [rep.Transcript("test", "rl", "p1", "12*3", "36", "Let's try again.",
                                  [rep.Attempt("35", "35", False), rep.Attempt("x", None, False),
                                   rep.Attempt("36", "36", True)])]
    html = rep.build_html(results, comparisons, max_turns=T, plots=plots, transcripts=transcripts,
                          meta={"run": "abc"})
    page = _Page()
    page.feed(html)
    cells = set(page.cells)
    for r in results:
        for name, _ in rep.metric_order(T):
            if name in r.metrics and not np.isnan(r.metrics[name].estimate):
                iv = r.metrics[name]
                assert f"{iv.estimate:.3f} [{iv.lo:.3f}, {iv.hi:.3f}]" in cells, (r.label, name)
    for c in comparisons:
        for name, iv in c.metrics.items():
            if not np.isnan(iv.estimate):
                assert f"{iv.estimate:+.3f} [{iv.lo:+.3f}, {iv.hi:+.3f}]" in cells, (c.label, name)
    assert len(page.srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert not re.search(r"https?://", html)
    assert "user: Let&#x27;s try again." in html and "∅" in html and "✓" in html


def test_a_difference_whose_interval_excludes_zero_is_marked_better_or_worse(summary):
    _, results, _ = summary
    up, down, unclear = Interval(0.1, 0.05, 0.15), Interval(-0.1, -0.15, -0.05), Interval(0.1, -0.05, 0.25)
    assert [rep.verdict("succ_at_1", iv) for iv in (up, down, unclear)] == ["better", "worse", "unclear"]
    assert [rep.verdict("invalid_rate", iv) for iv in (up, down, unclear)] == ["worse", "better", "unclear"]
    html = rep.build_html(results[:2], [rep.Comparison("test", "sft", "rl", {"succ_at_1": up, "repeat_share": up,
                                                                             "avg_turns": unclear})], max_turns=T)
    assert 'class="num better">+0.100' in html and 'class="num worse">+0.100' in html
    assert 'class="num">+0.100' in html


def _examples(seed: int, problems: list[str]) -> pd.DataFrame:
    """A per-episode table as the evaluate stage writes it, 2 episodes per problem."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, shown in (("sft", True), ("sft", False), ("rl", True)):
        for pid in problems:
            single, greedy = int(rng.integers(0, 6)), int(rng.integers(0, 2))
            for g in range(2):
                solved = int(rng.integers(-1, T))
                turns = solved + 1 if solved >= 0 else T
                rows.append({"model": model, "feedback": shown, "set": "test", "id": pid, "episode": g,
                             "solved_turn": solved, "num_turns": turns, "num_valid": turns,
                             "num_distinct": int(rng.integers(1, turns + 1)), "single_correct": single,
                             "num_samples": 5, "greedy_correct": greedy})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # any row order


def test_arms_from_examples_pool_seeds_problem_by_problem():
    ids = [f"p{i}" for i in range(7)]
    seeds = [_examples(0, ids), _examples(1, ids)]
    arms = rep.arms_from_examples(seeds, "test", T)
    by = {a.label: a for a in arms}
    assert sorted(by) == ["rl", "sft", "sft_no_feedback"]
    sft = by["sft"]
    num, den = sft.terms["succ_at_3"]
    assert num.shape == (2, 7) and (den == 2).all()  # seeds x problems, 2 episodes each
    for s, df in enumerate(seeds):  # row (seed s, problem p) holds that seed's episodes of p
        d = df[(df.model == "sft") & df.feedback].sort_values("id")
        assert num[s].tolist() == d.groupby("id").solved_turn.apply(lambda x: int((x >= 0).sum())).tolist()
    assert "pass_at_1" in sft.terms and "pass_at_1" not in by["sft_no_feedback"].terms
    with pytest.raises(ValueError, match="seed 1 holds other problems"):
        rep.arms_from_examples([seeds[0], _examples(1, ids[:-1])], "test", T)


def test_many_arms_split_results_and_differences_into_two_tables():
    arms = [synthetic_arm(f"arm{i}", True, 0.5, i) for i in range(5)]
    results, comparisons = rep.summarise_set("test", arms, [("arm0", f"arm{i}") for i in range(1, 5)], n_boot=100)
    html = rep.build_html(results, comparisons, max_turns=T, notes=["UFO beats single-turn RL."])
    assert html.count("<table>") == 3  # results, differences, glossary
    assert "<h3>Paired differences</h3>" in html and "<p>UFO beats single-turn RL.</p>" in html


def test_log_metrics_logs_every_metric_past_mlflows_batch_limit(workspace):
    """An ablation's headline with seed spreads holds more metrics than one MLflow batch: all are logged."""
    import mlflow

    from stages.common.tracking import MAX_METRICS_PER_BATCH, log_metrics

    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("batches")).info.run_id
    metrics = {f"eval/arm{i:04d}/succ_at_5": i / 7 for i in range(2 * MAX_METRICS_PER_BATCH + 1)}
    log_metrics(client, run_id, metrics)
    assert client.get_run(run_id).data.metrics == pytest.approx(metrics)
