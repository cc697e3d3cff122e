"""The pipeline with a real evaluation set: GSM8K's test file as an `eval` source beside the synthetic
training data. Evaluate reports it separately (`eval/gsm8k/<model>/<metric>`) from the held-out test
split (`eval/<model>/<metric>`). Skipped where ../shared/data is absent (GSM8K is never committed)."""

from __future__ import annotations

import mlflow
import pytest

from tests.helpers import MICRO, SHARED_DATA, find_runs, ufo_run, workspace_tracking_uri

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"{GSM8K_TEST} is absent (GSM8K is never committed)")
def test_a_gsm8k_eval_source_gets_its_own_metrics(ufo_workspace):
    sources = (f"[{{kind: multiplication, a_min: 100, a_max: 299}}, "
               f"{{kind: gsm8k, role: eval, path: '{GSM8K_TEST}', max_rows: 40}}]")
    proc = ufo_run(ufo_workspace, MICRO, "--set", f"curate.sources={sources}",
                   # a GSM8K question is up to ~1,000 characters for the character tokenizer
                   "--set", "sft.model.max_position_embeddings=1280", "--set", "evaluate.max_problems=8",
                   "--set", "evaluate.inference=[feedback]")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    mlflow.set_tracking_uri(workspace_tracking_uri(ufo_workspace))
    (ev,) = find_runs("tags.`ufo.stage` = 'evaluate'")
    m = ev.data.metrics
    for model in ("sft", "rl"):
        for name in ("succ_at_5", "pass_at_5", "effective_answer_ratio", "invalid_rate"):
            assert f"eval/gsm8k/{model}/{name}" in m and f"eval/gsm8k/{model}/{name}_lo" in m, (model, name)
            assert f"eval/{model}/{name}" in m  # the test split, under its short names
    (curate,) = find_runs("tags.`ufo.stage` = 'curate'")
    assert curate.data.metrics["data/eval/gsm8k_rows"] == 40  # kept whole (max_rows read)
