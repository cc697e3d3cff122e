"""The tiny default lands in a useful regime (slow: ~7 min per seed; `make test-slow`).

SFT: retrying already helps (Succ@5 - Succ@1 >= 0.08) and answers parse (invalid < 0.02).
RL: does not break the model (Succ@5 >= SFT's - 0.05, invalid < 0.05) and logs its training reward.
"""

from __future__ import annotations

import mlflow
import pytest

from tests.helpers import find_runs, metric_history, ufo_run, workspace_tracking_uri


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_default_lands_in_a_useful_regime(tmp_path, seed):
    proc = ufo_run(tmp_path / "ws", "configs/tiny.yaml", "--set", f"seed={seed}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    mlflow.set_tracking_uri(workspace_tracking_uri(tmp_path / "ws"))
    (ev,) = find_runs("tags.`ufo.stage` = 'evaluate'")
    m = ev.data.metrics
    print({k: round(v, 3) for k, v in sorted(m.items()) if k.startswith("eval/")})
    assert m["eval/sft/succ_at_5"] - m["eval/sft/succ_at_1"] >= 0.08
    assert m["eval/sft/invalid_rate"] < 0.02
    assert m["eval/rl/succ_at_5"] >= m["eval/sft/succ_at_5"] - 0.05
    assert m["eval/rl/invalid_rate"] < 0.05
    (rl_run,) = find_runs("tags.`ufo.stage` = 'rl'")
    assert len(metric_history(rl_run.info.run_id, "rollout/reward_mean")) == 130
