"""The RL stage's batch invariants are checked when the pipeline config is loaded, naming the field."""

from __future__ import annotations

import pytest

from flows.config import PipelineConfig
from stages.common.config import ConfigError, validate
from stages.rl import Config


@pytest.mark.parametrize("rl, expected", [
    # the rollout filter keeps int(0.25 * 32) = 8 groups x 8 = 64 episodes: 256 cannot be a minibatch
    ({"rollout_filter_fraction": 0.25}, "rl.minibatch_size: 256 must divide the episodes kept per step by the "
                                        "rollout filter (int(rollout_filter_fraction * problems_per_step) * "
                                        "group_size = 8 * 8 = 64)"),
    ({"rollout_filter_fraction": 0.01}, "rl.rollout_filter_fraction: keeps int(0.01 * 32) = 0 problem groups"),
    # 32 + 5 * 9 + 4 * 8 = 109 tokens at most per episode
    ({"micro_batch_tokens": 100}, "rl.micro_batch_tokens: 100 cannot hold one episode of up to 109 tokens"),
    ({"algorithm": "a2c"}, "rl.algorithm: Input should be 'ppo' or 'grpo'"),
    ({"kl_mode": "both"}, "rl.kl_mode: Input should be 'loss' or 'reward'"),
    ({"engine": {"kind": "deepspeed", "deepspeed": {"zero_stage": 3}}},
     "rl.engine.deepspeed.zero_stage: 3 is not available in the RL stage yet"),
    ({"engine": {"kind": "deepspeed"}, "critic": "value_head"},
     "rl.critic: 'value_head' trains the policy's decoder with the value loss in one backward"),
    ({"engine": {"num_processes": 2}}, "rl.engine.num_processes: 2 processes need kind 'deepspeed'"),
])
def test_rl_batch_invariants_fail_at_pipeline_load(rl, expected):
    with pytest.raises(ConfigError) as err:
        validate(PipelineConfig, {"rl": rl}, "pipeline.yaml")
    assert expected in str(err.value)


def test_the_paper_batch_with_its_rollout_filter_is_accepted():
    # 8 problems x 16 episodes, a quarter of the groups kept: 2 x 16 = 32 episodes, minibatches of 16
    cfg = Config(problems_per_step=8, group_size=16, rollout_filter_fraction=0.25, minibatch_size=16)
    assert cfg.kept_episodes == 32 and not cfg.skips_old_forward  # two optimizer steps per rollout
    assert Config(problems_per_step=8, group_size=16, rollout_filter_fraction=0.25, minibatch_size=32).skips_old_forward
