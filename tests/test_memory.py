"""Per-GPU ZeRO-2 memory of the paper's setting (stages/common/memory.py) against hand-computed values, and
the RL stage's ZeRO-3 refusal that states it."""

from __future__ import annotations

import pytest

from flows.config import PipelineConfig
from stages.common.config import ConfigError, validate
from stages.common.memory import QWEN25_3B, DecoderShape, describe_paper_setting, paper_setting, zero2_per_gpu

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_qwen25_3b_has_its_3_09b_parameters():
    # one layer: q 2048*2048 + o 2048*2048 + k, v 2 * 2048*256 + MLP 3 * 2048*11008
    #            + biases 2048 + 2*256 + norms 2*2048 = 77,076,992
    # 36 layers = 2,774,771,712; + tied embedding 151936*2048 = 311,164,928; + final norm 2048
    assert QWEN25_3B.params == 3_085_938_688
    # LoRA r=16 per layer: 16 * ((2048+2048)*2 + (2048+256)*2 + (2048+11008)*3) = 16 * 51,968; x 36 layers
    assert QWEN25_3B.lora_params(16, ALL_PROJECTIONS) == 29_933_568
    assert QWEN25_3B.lora_params(8, ["q_proj", "v_proj"]) == 36 * 8 * (4096 + 2304)


def test_zero2_per_gpu_of_the_paper_setting():
    m = paper_setting()
    psi, lora = 3_085_938_688, 29_933_568
    # Full weights: 2Ψ whole + 2Ψ/8 gradients + 12Ψ/8 Adam = 6.17 + 0.77 + 4.63 GB = 11.57 GB; + 2Ψ reference
    full = m["full"]
    assert (full.weights, full.gradients, full.optimizer) == (6_171_877_376, 771_484_672, 4_628_908_032)
    assert full.total - full.reference == 11_572_270_080 and full.reference == 2 * psi
    # LoRA: the bf16 base and adapters whole, 14 bytes per adapter parameter over 8: 6.23 + 0.05 GB
    low = m["lora"]
    assert (low.weights, low.gradients, low.optimizer, low.reference) == (
        2 * (psi + lora), 7_483_392, 44_900_352, 0)
    assert low.total == 6_284_128_256
    assert "5.9 GiB under ZeRO-2 with LoRA and 10.8 GiB full-weight (+5.7 GiB" in describe_paper_setting()


def test_one_gpu_holds_everything():
    tiny = DecoderShape(hidden=4, layers=1, intermediate=8, kv_dim=2, vocab=10)
    m = zero2_per_gpu(tiny.params, tiny.params, 1)
    assert m.total == 16 * tiny.params  # the ZeRO paper's 16Ψ without partitioning


def test_rl_refuses_zero3_saying_why_zero2_fits():
    with pytest.raises(ConfigError) as err:
        validate(PipelineConfig, {"rl": {"engine": {"kind": "deepspeed", "deepspeed": {"zero_stage": 3}}}}, "p.yaml")
    assert "rl.engine.deepspeed.zero_stage: 3 is not available" in str(err.value)
    assert describe_paper_setting() in str(err.value)
