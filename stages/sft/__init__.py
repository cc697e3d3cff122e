"""SFT warmup: teach the policy the answer format, and to answer again after "Let's try again.".

A mix of single-turn examples and multi-turn ones whose earlier attempts are answers to OTHER random
problems, each followed by the feedback turn; loss on the final answer's tokens only. Without the
multi-turn share the model cannot continue after feedback (most later answers are unparsable); with
near-miss wrong attempts it learns to copy the previous attempt (see
shared/research/tiny-cpu-calibration.md). Training stops when sampled validation accuracy reaches a
target, since a fixed step count lands different seeds in very different places.

Scale: `engine` picks plain torch in this process, LoRA adapters (peft; the logged `model` is merged,
the `adapter` is logged too) and/or DeepSpeed ZeRO-2/3 on `engine.num_processes` ranks that the stage
launches itself (torchrun or the deepspeed launcher; rank 0 logs the metrics, the stage the artifacts).
`micro_batch_size` accumulates gradients; `batching: pack` packs examples into rows.

Launch: python -m stages.sft --config sft.yaml   (its `data` field holds the curate Output)
"""

from __future__ import annotations

from stages.sft.config import Config, Output

__all__ = ["Config", "Output", "run"]


def run(config: Config, parent_run_id: str | None = None, run_id: str | None = None) -> Output:
    """Warm up the policy in the stage's MLflow run; return the Output (torch is imported only here)."""
    from stages.common.tracking import run_stage
    from stages.sft.stage import train

    return run_stage("sft", config, train, parent_run_id=parent_run_id, run_id=run_id)
