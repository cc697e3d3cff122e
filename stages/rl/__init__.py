"""Multi-turn RL with unary feedback (UFO, arXiv 2507.14295): PPO with a GAE critic, or GRPO.

Each step: sample problems -> play group_size episodes per problem (answer, "Let's try again." on a
wrong answer, up to max_turns) through the rollout engine -> episode returns gamma**t - lambda*(1 - E/T)
-> keep the problem groups whose returns spread most (optional) -> advantages: GAE over the generated
tokens of all turns with the return on the last one (PPO), or group-normalised returns (GRPO) ->
clipped update with a KL term to the SFT reference (as a loss or a reward) -> log -> checkpoint every
N steps (a rerun of a killed stage resumes from it; see stages/rl/checkpoint.py).
The update trains on exactly the sampled token ids; only generated tokens carry loss.

Launch: python -m stages.rl --config rl.yaml   (its `sft` and `data` fields hold upstream Outputs)
"""

from __future__ import annotations

from stages.rl.config import Config, Output

__all__ = ["Config", "Output", "run"]


def run(config: Config, parent_run_id: str | None = None, run_id: str | None = None) -> Output:
    """Train the policy with UFO episodes in the stage's MLflow run; return the Output."""
    from stages.common.tracking import run_stage
    from stages.rl.stage import train

    return run_stage("rl", config, train, parent_run_id=parent_run_id, run_id=run_id)
