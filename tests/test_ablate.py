"""`ufo ablate`: arms from shared warm starts, pooled over seeds, with intervals; run for real on the
micro pipeline (two seeds, two arms), then MLflow and Prefect are queried."""

from __future__ import annotations

import math
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from flows.ablate import load_suite, paper_findings, seed_spread, spread_lines, spread_metrics
from stages.common.config import ConfigError
from tests.helpers import REPO, find_runs, prefect_states, ufo_env, with_stores, workspace_tracking_uri

SUITE = "tests/configs/ablation-micro.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_every_suite_validates(path):
    suite, arms = load_suite(path)
    assert len(arms) >= 2 and all(a.evaluate.max_turns == 5 for a in arms.values())


def test_the_single_turn_arm_is_configurable_and_still_evaluated_over_five_turns():
    _suite, arms = load_suite(REPO / "configs" / "ablations" / "paper-tiny.yaml")
    single = arms["single_turn"]
    assert single.rl.max_turns == 1 and single.rl.repetition_penalty == 0
    assert single.evaluate.max_turns == 5 and single.sft == arms["ufo"].sft  # one warm start for all arms


def test_an_arm_that_changes_more_than_rl_is_refused(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"base: {REPO / 'tests/configs/micro.yaml'}\narms:\n  a: []\n  b: [sft.lr=0.1]\n")
    with pytest.raises(ConfigError, match=r"arms\.b: 'sft.lr=0.1' changes more than RL"):
        load_suite(suite)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, migrated_stores):
    ws = with_stores(tmp_path_factory.mktemp("ablation"), migrated_stores)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ablate", SUITE], cwd=REPO, capture_output=True,
                          text=True, env=ufo_env(ws), timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    mlflow.set_tracking_uri(workspace_tracking_uri(ws))
    return ws, proc


def test_one_ablation_run_with_its_arms_stages_and_report(ablation, tmp_path):
    ws, proc = ablation
    (parent,) = find_runs("tags.`ufo.kind` = 'ablation'")
    assert parent.info.status == "FINISHED"
    pid = parent.info.run_id
    children = find_runs(f"tags.`mlflow.parentRunId` = '{pid}'")
    arms = {r.data.tags["ufo.arm"]: r for r in children if r.data.tags.get("ufo.kind") == "arm"}
    assert sorted(arms) == ["single_turn", "ufo"] and all(r.info.status == "FINISHED" for r in arms.values())
    stages = sorted(r.data.tags["ufo.stage"] for r in children if "ufo.stage" in r.data.tags)
    assert stages == ["curate", "evaluate", "evaluate", "sft", "sft"]  # one curate; per seed one SFT, one evaluate
    for arm, run in arms.items():
        rl_runs = find_runs(f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert len(rl_runs) == 2 and {r.data.tags["ufo.stage"] for r in rl_runs} == {"rl"}, arm
        assert {r.data.params["seed"] for r in rl_runs} == {"0", "1"}
        assert {r.data.params["max_turns"] for r in rl_runs} == {"1" if arm == "single_turn" else "5"}
        lo, mid, hi = (run.data.metrics[f"eval/succ_at_5{s}"] for s in ("_lo", "", "_hi"))
        assert lo <= mid <= hi
    m = parent.data.metrics
    for name in ("succ_at_5", "pass_at_5", "effective_answer_ratio", "avg_turns"):
        for who in ("sft", "single_turn", "ufo", "ufo_vs_single_turn"):
            assert all(math.isfinite(m[f"eval/{who}/{name}{s}"]) for s in ("", "_lo", "_hi")), (who, name)
    # Feedback at inference vs none (finding 4): single-turn metrics such as Pass@k do not depend on it.
    assert all(math.isfinite(m[f"eval/ufo_vs_ufo_no_feedback/succ_at_5{s}"]) for s in ("", "_lo", "_hi"))
    html = mlflow.artifacts.load_text(f"runs:/{pid}/report/ablation.html")
    assert "single_turn" in html and "ufo − single_turn" in html and "<img" in html
    # The pooled interval is over both seeds: 12 problems x 2 seeds.
    assert "12 problems, 2 seed(s)" in html


def test_prefect_shows_each_arm_and_seed_as_a_subflow_run(ablation):
    ws, _ = ablation
    flows = dict(prefect_states(ws)["flow_run"])
    arm_runs = sorted(name for name in flows if name.startswith(("single_turn-seed", "ufo-seed")))
    assert arm_runs == ["single_turn-seed0", "single_turn-seed1", "ufo-seed0", "ufo-seed1"]
    assert all(state == "COMPLETED" for state in flows.values()), flows


def test_the_findings_read_the_paired_intervals_beside_the_paper():
    flat = {"eval/ufo_vs_single_turn/succ_at_5": 0.05, "eval/ufo_vs_single_turn/succ_at_5_lo": 0.01,
            "eval/ufo_vs_single_turn/succ_at_5_hi": 0.09,
            "eval/ufo_vs_single_turn/effective_answer_ratio": 0.02,
            "eval/ufo_vs_single_turn/effective_answer_ratio_lo": -0.01,
            "eval/ufo_vs_single_turn/effective_answer_ratio_hi": 0.05,
            "eval/single_turn/repeat_share": 0.7, "eval/single_turn/repeat_share_lo": 0.6,
            "eval/single_turn/repeat_share_hi": 0.8, "eval/ufo/repeat_share": 0.4, "eval/ufo/repeat_share_lo": 0.3,
            "eval/ufo/repeat_share_hi": 0.5}
    one, three, repeat, figure1 = paper_findings(flat, 5)
    assert figure1.startswith("The paper's Figure 1") and "after single-turn RL 0.700 [0.600, 0.800]" in figure1
    assert "Succ@5" in one and "+0.050 [+0.010, +0.090], interval above 0" in one and "+14%" in one
    assert "+0.020 [-0.010, +0.050], interval includes 0" in three and "92.8%" in three
    assert "0.700 [0.600, 0.800]" in repeat and "UFO's: 0.400" in repeat and "70%" in repeat
    assert paper_findings({"eval/ufo/succ_at_5": 0.5}, 5) == []  # a suite without both arms


def _frame(seed_outcomes: dict[str, list[int]]) -> pd.DataFrame:
    """Examples of one seed: per model, the solved turn of each problem's one episode (-1: unsolved, 5 turns)."""
    rows = []
    for model, solved in seed_outcomes.items():
        for i, turn in enumerate(solved):
            turns = 5 if turn < 0 else turn + 1
            rows.append({"set": "test", "model": model, "feedback": True, "id": f"p{i}", "episode": 0,
                         "solved_turn": turn, "num_turns": turns, "num_valid": turns, "num_distinct": turns,
                         "single_correct": 1, "num_samples": 5, "greedy_correct": 0})
    return pd.DataFrame(rows)


def test_each_difference_gets_its_seed_to_seed_spread():
    """Seed 0: UFO solves both problems, single-turn RL one (Succ@5 +0.5); seed 1: both solve one (0)."""
    seeds = [_frame({"single_turn": [0, -1], "ufo": [0, 2]}), _frame({"single_turn": [1, -1], "ufo": [0, -1]})]
    spread = seed_spread(seeds, "test", [("single_turn", "ufo")], 5)
    assert spread["ufo_vs_single_turn"]["succ_at_5"] == [0.5, 0.0]
    assert spread["ufo_vs_single_turn"]["succ_at_1"] == [0.0, 0.5]
    assert spread["ufo_vs_single_turn"]["avg_turns"] == [-1.0, -0.5]  # (1+3)/2 - (1+5)/2; (1+5)/2 - (2+5)/2
    flat = spread_metrics(spread, "test")
    assert flat["eval/ufo_vs_single_turn/succ_at_5_seed_sd"] == pytest.approx(0.5 / 2 ** 0.5)  # stdev of (0.5, 0)
    assert (flat["eval/ufo_vs_single_turn/succ_at_5_seed_min"], flat["eval/ufo_vs_single_turn/succ_at_5_seed_max"]) \
        == (0.0, 0.5)
    (line,) = spread_lines(spread)
    assert line.startswith("Seed by seed, ufo - single_turn:") and "succ_at_5 +0.500 / +0.000, sd 0.354" in line
