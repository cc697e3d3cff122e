"""LoRA through peft: only the adapters train, and the merged export is a plain transformers model whose
logits equal base + adapter (float32, atol 1e-5)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages import sft
from stages.common.engine import build_engine
from stages.common.model import build_model, checkpoint_dirs, load_pretrained, save_pretrained
from stages.common.model_spec import EngineConfig, LoraConfig, ModelConfig
from stages.common.tracking import fetch_verified
from tests.helpers import FEEDBACK, multiplication_problems

pytest.importorskip("peft")  # until pyproject.toml lists peft outside the gpu extra

CPU = torch.device("cpu")
LORA = EngineConfig(lora=LoraConfig(r=4, alpha=8))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A 'pretrained' tiny chat model on disk (random weights): what init=pretrained loads."""
    problems = multiplication_problems()
    torch.manual_seed(0)
    spec = ModelConfig(init="scratch_chat", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_position_embeddings=192)
    model, tok = build_model(spec, [p.question for p in problems] + [p.answer for p in problems], FEEDBACK, CPU)
    return save_pretrained(model, tok, tmp_path_factory.mktemp("base") / "model")


def _train(engine, steps=3):
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 200, (4, 12))
        engine.backward(engine.module(input_ids=ids, labels=ids).loss)
        engine.step()


def test_only_adapter_parameters_change_and_the_merged_export_matches(base_folder, tmp_path):
    model, tok = load_pretrained(base_folder, CPU, ModelConfig(init="pretrained", name_or_path=str(base_folder)))
    engine = build_engine(model, LORA, lr=1e-2, weight_decay=0.0, grad_clip=1.0, lr_lambda=lambda s: 1.0)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _train(engine)
    changed = {n for n, p in engine.module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # every adapter moved (B from zero at step 1, A from step 2) and nothing else

    folder = engine.export(tok, tmp_path / "merged")
    weights = load_file(folder / "model.safetensors")
    assert not any("lora" in k for k in weights)
    plain = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    ids = torch.randint(0, 200, (3, 20))
    engine.module.eval()
    with torch.no_grad():
        want = engine.module(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-3, "the adapters changed nothing"


def test_sft_stage_with_lora_logs_a_merged_model_and_the_adapter(curated, base_folder, tmp_path):
    cfg = sft.Config(experiment="lora", data=curated, engine=LORA, max_steps=3, eval_every=3, val_problems=8,
                     batch_size=8, lr=1e-2, warmup_steps=0,
                     model=ModelConfig(init="pretrained", name_or_path=str(base_folder)))
    out = sft.run(cfg)
    # a pretrained start is also logged once as the MLflow model SFT started from (`base_model`)
    assert set(out.artifacts) == {"model", "adapter", "mlflow_model", "base_model"}
    base = checkpoint_dirs(fetch_verified(out.artifact("base_model"), tmp_path / "b"))[0]
    imported, original = load_file(base / "model.safetensors"), load_file(base_folder / "model.safetensors")
    assert imported.keys() == original.keys() and all(torch.equal(imported[k], original[k]) for k in original)
    merged = fetch_verified(out.artifact("model"), tmp_path / "m")
    adapter = fetch_verified(out.artifact("adapter"), tmp_path / "a")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    before, after = load_file(base_folder / "model.safetensors"), load_file(merged / "model.safetensors")
    assert before.keys() == after.keys()
    # Merged adapters change exactly the targeted projections; embeddings and norms stay as they were.
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])
    assert out.metrics["sft/steps"] == 3
