"""The evaluate stage for real on a local SQLite MLflow store: several models (a pipeline Output, a
`runs:/` URI, a registered MLflow transformers model by alias) on two eval sets, with and without
feedback; the metrics, intervals, paired differences, report, plots and per-model tables it logs.
Then the bad-input paths. A tiny random model: what is checked here is the plumbing; the metric values
are checked against hand counts in test_metrics.py and the intervals in test_stats.py. ~40 s."""

from __future__ import annotations

import json
import re

import mlflow
import pandas as pd
import pytest

from stages import evaluate
from stages.common import report as rep
from stages.common.config import ConfigError
from stages.common.contracts import ArtifactRef
from stages.common.tracking import fetch_verified
from stages.evaluate.stage import checkpoint_dirs
from tests.helpers import log_upstream, multiplication_problems

T = 3
TEST_PROBLEMS, HARD_PROBLEMS = 8, 6


@pytest.fixture(scope="module")
def eval_upstream(module_workspace, tiny, tmp_path_factory):
    """A curate Output with a `test` split and an `eval/hard` set, the tiny model as an SFT Output, and
    the same weights registered as an MLflow transformers model `tiny@champion`."""
    model, fmt, _ = tiny
    problems = multiplication_problems(TEST_PROBLEMS + HARD_PROBLEMS)
    data, sft = log_upstream(model, fmt, {"test": problems[:TEST_PROBLEMS], "eval/hard": problems[TEST_PROBLEMS:]},
                             tmp_path_factory.mktemp("upstream"), "evaluate-tests")
    with mlflow.start_run(run_id=sft.run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": fmt.tokenizer}, task="text-generation", name="hf",
            pip_requirements=["torch==2.13.0", "transformers>=5,<6"])  # inference would need torchvision
    version = mlflow.register_model(info.model_uri, "tiny")
    mlflow.MlflowClient().set_registered_model_alias("tiny", "champion", version.version)
    return data, sft


def _config(eval_upstream, **kw) -> evaluate.Config:
    data, sft = eval_upstream
    # Short garbage answers: grading random text through math-verify is what costs time here.
    return evaluate.Config(experiment="evaluate-tests", data=data, sft=sft, max_turns=T, num_samples=T,
                           max_new_tokens=4, bootstrap_samples=200, transcripts=2, **kw)


@pytest.fixture(scope="module")
def evaluated(eval_upstream):
    _, sft = eval_upstream
    return evaluate.run(_config(eval_upstream, models={"plain": f"runs:/{sft.run_id}/model",
                                                  "registered": "models:/tiny@champion"}))


def test_every_model_set_and_condition_is_logged_with_its_interval(evaluated):
    logged = mlflow.MlflowClient().get_run(evaluated.run_id).data.metrics
    assert evaluated.metrics == {k: pytest.approx(v) for k, v in logged.items() if k.startswith("eval/")}
    for model in ("sft", "plain", "registered"):
        for prefix in ("eval/", "eval/hard/"):
            for metric in ("succ_at_1", f"succ_at_{T}", "succ_auc", f"pass_at_{T}", "greedy_accuracy",
                           "avg_turns", "effective_answer_ratio", "invalid_rate", "self_correction_at_2"):
                key = f"{prefix}{model}/{metric}"
                assert logged[f"{key}_lo"] <= logged[key] <= logged[f"{key}_hi"], key
            assert f"{prefix}{model}_no_feedback/succ_at_{T}" in logged
            assert f"{prefix}{model}_no_feedback/pass_at_1" not in logged  # single-turn: only once per model
            assert f"{prefix}{model}_vs_{model}_no_feedback/succ_at_{T}" in logged
    assert "eval/registered_vs_plain/succ_at_1" in logged and "eval/hard/plain_vs_sft/pass_at_1" in logged
    assert not any(k.startswith("eval/test/") for k in logged)  # the test split keeps the short names


def test_the_same_weights_by_output_by_run_uri_and_by_registry_alias_give_the_same_results(evaluated):
    """Each model samples from the same seed: identical weights must give identical episodes, which shows
    that the URI and the registry alias really loaded the SFT weights and tokenizer."""
    m = evaluated.metrics
    for prefix in ("eval/", "eval/hard/"):
        for name in [k.removeprefix(f"{prefix}sft/") for k in m if k.startswith(f"{prefix}sft/")]:
            assert m[f"{prefix}plain/{name}"] == m[f"{prefix}sft/{name}"] == m[f"{prefix}registered/{name}"]
        diff = f"{prefix}registered_vs_sft/succ_at_{T}"
        assert m[diff] == m[f"{diff}_lo"] == m[f"{diff}_hi"] == 0.0
    params = mlflow.MlflowClient().get_run(evaluated.run_id).data.params
    assert re.fullmatch(r"[0-9a-f]{64}", params["models.registered.sha256"])


def test_feedback_and_no_feedback_share_their_first_answers(evaluated, tmp_path):
    """Common random numbers: both conditions start from the same seed, so turn 1 is the same sample."""
    table = pd.read_parquet(fetch_verified(evaluated.artifact("examples"), tmp_path))
    assert len(table) == 3 * 2 * (TEST_PROBLEMS + HARD_PROBLEMS)  # models x conditions x problems
    first = table.assign(first=table.attempts.map(lambda a: json.loads(a)[0]["reply"]))
    pivot = first.pivot_table(index=["set", "model", "id"], columns="feedback", values="first", aggfunc="first")
    assert (pivot[True] == pivot[False]).all()
    assert evaluated.metrics["eval/sft_vs_sft_no_feedback/succ_at_1"] == 0.0


def test_without_feedback_the_retry_follows_an_empty_user_turn(tiny):
    """The no-feedback condition keeps the conversation (earlier answers stay in context) and replaces the
    feedback text with an empty user turn."""
    from stages.evaluate.stage import evaluate_model

    model, fmt, problems = tiny
    cfg = evaluate.Config(max_turns=T, num_samples=T, max_new_tokens=4)
    ev = evaluate_model(model, fmt.tokenizer, problems[:4], cfg)
    feedback_id = fmt.tokenizer.convert_tokens_to_ids(fmt.feedback)
    with_fb, without = ev.episodes[True][0], ev.episodes[False][0]
    assert feedback_id in with_fb.turns[1].context_ids and feedback_id not in without.turns[1].context_ids
    assert fmt.tokenizer.decode(without.turns[1].context_ids[-3:]) == "<|user|><|end|><|assistant|>"
    assert without.token_ids()[: len(without.turns[0].context_ids) + len(without.turns[0].answer_ids)] == \
        without.turns[0].context_ids + without.turns[0].answer_ids  # the first answer stays in context


def test_examples_rebuild_the_logged_metrics(evaluated, tmp_path):
    """The per-episode parquet is enough to recompute every metric (how an ablation pools seeds)."""
    table = pd.read_parquet(fetch_verified(evaluated.artifact("examples"), tmp_path))
    for set_name in ("test", "hard"):
        arms = rep.arms_from_examples([table], set_name, T)
        results, _ = rep.summarise_set(set_name, arms, [], n_boot=200, seed=0)
        for r in results:
            for metric, iv in r.metrics.items():
                key = rep.metric_key(set_name, r.label, metric)
                if key in evaluated.metrics:
                    assert iv.estimate == pytest.approx(evaluated.metrics[key]), key


def test_report_plots_and_per_model_tables_are_logged(evaluated, tmp_path):
    html = fetch_verified(evaluated.artifact("report_html"), tmp_path / "html").read_text()
    assert html.count("data:image/png;base64,") == 4  # curves and differences, two sets
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # self-contained
    for label in ("sft", "sft_no_feedback", "plain", "registered_no_feedback"):
        assert f"<th>{label}</th>" in html
    plots = fetch_verified(evaluated.artifact("plots"), tmp_path / "plots")
    assert sorted(p.name for p in plots.iterdir()) == ["curves_hard.png", "curves_test.png",
                                                       "differences_hard.png", "differences_test.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.iterdir())
    assert fetch_verified(evaluated.artifact("curves"), tmp_path / "c").name == "curves_test.png"
    report = json.loads(fetch_verified(evaluated.artifact("report"), tmp_path / "json").read_text())
    assert {(r["set"], r["label"]) for r in report["results"]} >= {("test", "sft"), ("hard", "plain_no_feedback")}
    run = mlflow.MlflowClient().get_run(evaluated.run_id)
    tables = {t["path"] for t in json.loads(run.data.tags["mlflow.loggedArtifacts"])}
    assert tables == {f"eval/tables/{s}/{m}.json" for s in ("test", "hard")
                      for m in ("sft", "sft_no_feedback", "plain", "plain_no_feedback", "registered",
                                "registered_no_feedback")}
    table = mlflow.load_table("eval/tables/test/registered.json", run_ids=[evaluated.run_id])
    assert len(table) == TEST_PROBLEMS and list(table.columns[:4]) == ["id", "episode", "solved_turn", "graded"]
    assert "Succ@1" in run.data.tags["mlflow.note.content"]


def test_only_the_sets_asked_for(eval_upstream):
    out = evaluate.run(_config(eval_upstream, sets=["hard"], inference=["no_feedback"], max_problems=4))
    assert {k.split("/")[1] for k in out.metrics} == {"hard"}
    assert "eval/hard/sft_no_feedback/pass_at_1" in out.metrics  # no feedback arm: single-turn metrics go here


@pytest.mark.parametrize(("change", "message"), [
    ({"sets": ["nope"]}, r"evaluate.sets: \['nope'\] not in the curate output; it has \['hard', 'test'\]"),
    ({"models": {"ghost": "runs:/0123456789abcdef0123456789abcdef/model"}}, r"evaluate.models: cannot download"),
])
def test_bad_input_is_a_clear_error_before_any_model_is_evaluated(eval_upstream, change, message):
    with pytest.raises(ConfigError, match=message):
        evaluate.run(_config(eval_upstream, **change))


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="not a transformers checkpoint"):
        checkpoint_dirs(tmp_path)
    (tmp_path / "MLmodel").write_text("flavors:\n  transformers:\n    source_model_name: org/big\n")
    with pytest.raises(ConfigError, match="save_pretrained=False.*org/big"):
        checkpoint_dirs(tmp_path)


@pytest.mark.parametrize(("fields", "message"), [
    ({"models": {"sft": "runs:/x/model"}}, "models.sft: the name is taken"),
    ({"models": {"a_vs_b": "runs:/x/model"}}, "models.a_vs_b: a name is"),
    ({"inference": ["feedback", "feedback"]}, "lists a condition twice"),
    ({"inference": []}, "inference"),
])
def test_config_refuses_ambiguous_names_and_conditions(fields, message):
    with pytest.raises(ValueError, match=message):
        evaluate.Config(**fields)


def test_config_resampling_choices_match_the_stats_module():
    from typing import get_args

    from stages.common.stats import Resampling
    from stages.evaluate.config import Resampling as ConfigResampling

    assert get_args(ConfigResampling) == get_args(Resampling)


def test_artifact_ref_of_an_sft_output_is_what_evaluate_loads(eval_upstream):
    _, sft = eval_upstream
    assert isinstance(sft.artifact("model"), ArtifactRef)
