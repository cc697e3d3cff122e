"""LoRA on the RL policy (rl.engine.lora): only the adapters train, the KL reference is the base model
(the policy with its adapter disabled, no second copy), and the stage logs a merged plain-transformers
model whose logits equal the trained policy's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages import rl
from stages.common.model_spec import EngineConfig, LoraConfig
from stages.common.tracking import fetch_verified
from stages.rl import Config
from stages.rl.batch import collate, micro_batches
from stages.rl.models import build_models, critic_values, score
from stages.rl.stage import assign_advantages, forward_all, update

pytest.importorskip("peft")  # until pyproject.toml lists peft outside the gpu extra

CPU = torch.device("cpu")
LORA = EngineConfig(lora=LoraConfig(r=4, alpha=8))


def _config(**kw) -> Config:
    return Config(problems_per_step=4, group_size=4, minibatch_size=16, max_turns=3, max_new_tokens=6,
                  max_prompt_tokens=12, max_feedback_tokens=4, kl_coef=0.1, lr=1e-2, critic_lr=1e-2, engine=LORA, **kw)


def _reference_logprobs(models, batch, chunks) -> torch.Tensor:
    with models.reference_model() as reference:
        return forward_all(reference, lambda mb, kv: score(reference, mb, 1.0, kv=kv).logprobs, batch, chunks, CPU)


@pytest.mark.parametrize("kw", [dict(algorithm="grpo"), dict(algorithm="ppo", critic="separate")],
                         ids=["grpo", "ppo-separate"])
def test_lora_policy_trains_only_adapters_and_its_reference_is_the_base_model(tiny_rollout, kw):
    folder, fmt, episodes = tiny_rollout
    cfg = _config(**kw)
    models = build_models(cfg, folder, CPU)
    assert models.reference is None and models.has_reference  # no copy of the weights: the adapter is disabled
    base = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    batch = collate(episodes, fmt.pad_id)
    chunks = micro_batches(batch.lengths, torch.arange(len(batch)), cfg.micro_batch_tokens)
    where = batch.response_mask.bool()
    base_logprobs = forward_all(base, lambda mb, kv: score(base, mb, 1.0, kv=kv).logprobs, batch, chunks, CPU)

    batch.ref_logprobs = _reference_logprobs(models, batch, chunks)
    torch.testing.assert_close(batch.ref_logprobs[where], base_logprobs[where], rtol=0, atol=1e-6)
    if models.critic is not None:
        batch.old_values = forward_all(models.critic, lambda mb, kv: critic_values(models, mb, kv), batch, chunks, CPU)
    assign_advantages(batch, torch.linspace(-1, 1, len(batch)), cfg)

    named = dict(models.policy.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in named.items()}
    for _ in range(2):  # B starts at zero: A moves from the second step on
        update(models, batch, cfg, CPU)
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed == trainable  # every adapter matrix moved, no base weight did

    # After the update the policy differs from the base, and the reference still IS the base.
    with torch.no_grad():
        policy_logprobs = forward_all(models.policy, lambda mb, kv: score(models.policy, mb, 1.0, kv=kv).logprobs,
                                      batch, chunks, CPU)
    assert (policy_logprobs[where] - base_logprobs[where]).abs().max() > 1e-3
    torch.testing.assert_close(_reference_logprobs(models, batch, chunks)[where], base_logprobs[where],
                               rtol=0, atol=1e-6)
    # and the adapter is back on after the reference pass
    with torch.no_grad():
        again = forward_all(models.policy, lambda mb, kv: score(models.policy, mb, 1.0, kv=kv).logprobs,
                            batch, chunks, CPU)
    assert torch.equal(again, policy_logprobs)


def test_rl_stage_with_lora_logs_a_merged_model_that_loads(upstream, tmp_path):
    data, sft = upstream
    base_folder = fetch_verified(sft.artifact("model"), tmp_path / "sft")
    cfg = rl.Config(experiment="rl-lora", data=data, sft=sft, steps=3, problems_per_step=4, group_size=4,
                    minibatch_size=16, max_turns=2, max_new_tokens=6, max_prompt_tokens=12, max_feedback_tokens=4,
                    lr=5e-2, critic_lr=1e-2, algorithm="ppo", critic="separate", kl_coef=0.05, engine=LORA)
    out = rl.run(cfg)
    folder = fetch_verified(out.artifact("model"), tmp_path / "model")
    before, after = load_file(base_folder / "model.safetensors"), load_file(folder / "model.safetensors")
    assert before.keys() == after.keys()  # merged: no lora_A/lora_B entries, the base model's names
    # The adapters' targets changed; what LoRA does not touch (embeddings, norms) is the SFT model's exactly.
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])
    merged = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()  # plain transformers
    with torch.no_grad():
        logits = merged(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.isfinite().all()
    assert out.metrics["rl/steps"] == 3
