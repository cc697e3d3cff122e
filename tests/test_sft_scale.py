"""SFT at scale, on the tiny models: the learning-rate schedule, gradient accumulation and packing give
the same objective as one padded batch, the config's batch invariants, and the tiny chat model through
the real stage (a folder plain transformers loads, chat template included)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import sft
from stages.common.config import ConfigError, load_config
from stages.common.model_spec import ModelConfig
from stages.common.tracking import fetch_verified
from stages.sft.batching import micro_batches, num_targets, pack_batch, pad_batch
from stages.sft.stage import lr_lambda, make_examples
from tests.helpers import REPO, TINY_CHAT, metric_history

CPU = torch.device("cpu")


def _examples(fmt, problems, **cfg):
    config = sft.Config(model=TINY_CHAT, batch_size=32, max_wrong_attempts=3, **cfg)
    return config, make_examples(fmt, problems, config, random.Random(0))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(sft.Config(warmup_steps=10, max_steps=110, min_lr_ratio=0.1))
    assert [f(0), f(4), f(9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def _grads(model, batches, targets):
    model.zero_grad()
    for forwards in batches:
        sum(model(**f, use_cache=False, num_items_in_batch=targets).loss for f in forwards).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("batching", ["bucket", "pad", "pack"])
def test_accumulated_micro_batches_give_the_one_batch_gradient(tiny_chat, batching):
    """4 micro-batches of 8, each bucketed, padded or packed == one padded batch of 32, to float error."""
    model, fmt, problems = tiny_chat
    config, examples = _examples(fmt, problems, micro_batch_size=8, batching=batching, pack_length=96)
    targets = num_targets(examples)
    batches = micro_batches(examples, config, fmt.pad_id, 96, CPU)
    assert len(batches) == config.micro_steps == 4
    reference = _grads(model, [[pad_batch(examples, fmt.pad_id, CPU)]], targets)
    got = _grads(model, batches, targets)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_keep_attention_within_each_example(tiny_chat):
    model, fmt, problems = tiny_chat
    _, examples = _examples(fmt, problems)
    packed = pack_batch(examples, fmt.pad_id, 192, CPU)
    assert packed["input_ids"].shape[0] < len(examples) / 3  # several examples a row
    # Row 0's tokens, example by example, scored alone vs packed: identical logits.
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"][:1], position_ids=packed["position_ids"][:1],
                       use_cache=False).logits[0]
        starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
        for a, b in zip(starts, starts[1:], strict=False):
            alone = model(input_ids=packed["input_ids"][:1, a:b]).logits[0]
            torch.testing.assert_close(logits[a:b], alone, rtol=1e-4, atol=1e-5)
    assert int((packed["labels"] != -100).sum()) == sum(sum(m) for _, m, _ in examples)


def test_pack_refuses_an_example_longer_than_a_row(tiny_chat):
    _, fmt, problems = tiny_chat
    _, examples = _examples(fmt, problems)
    with pytest.raises(ConfigError, match="sft.pack_length"):
        pack_batch(examples, fmt.pad_id, 20, CPU)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"batch_size": 100, "micro_batch_size": 16}, "batch_size: 100 must be a multiple of micro_batch_size"),
    ({"batch_size": 64, "micro_batch_size": 16, "engine": {"kind": "deepspeed", "num_processes": 3}},
     "batch_size: 64 must be a multiple"),
    ({"engine": {"num_processes": 2}}, "engine.num_processes: 2 processes need kind 'deepspeed'"),
    ({"engine": {"kind": "deepspeed", "deepspeed": {"zero_stage": 3}}}, "batching: 'bucket' runs a varying"),
    ({"engine": {"lora": {"r": 4}}}, "engine.lora: adapters on a randomly initialised model"),
    ({"engine": {"kind": "deepspeed", "deepspeed": {"offload_param": True}}}, "offload_param: needs zero_stage 3"),
])
def test_sft_config_invariants_name_the_field(tmp_path, overrides, expected):
    import yaml

    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(overrides))
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(sft.Config, path)


def test_model_spec_defaults_are_safe():
    spec = ModelConfig(init="pretrained", name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    assert spec.trust_remote_code is False and spec.dtype == "float32" and spec.revision is None
    assert (REPO / "configs" / "tiny-chat.yaml").is_file()


def test_tiny_chat_sft_stage_logs_a_plain_transformers_chat_model(curated, tmp_path):
    cfg = sft.Config(experiment="sft-scale", data=curated, model=TINY_CHAT, max_steps=6, eval_every=3,
                     val_problems=16, batch_size=16, micro_batch_size=8, batching="pack", log_every=2,
                     lr=1e-2, warmup_steps=0)
    out = sft.run(cfg)
    folder = fetch_verified(out.artifact("model"), tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    text = tok.apply_chat_template([{"role": "user", "content": "123*4"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    losses = metric_history(out.run_id, "loss/sft")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert out.metrics["sft/steps"] == 6


@pytest.mark.parametrize("name", ["qwen2.5-3b-paper.yaml", "qwen2.5-3b-paper-1gpu.yaml"])
def test_paper_configs_hold_the_paper_setting_and_no_neighbour_paths(name):
    from flows.config import PipelineConfig

    cfg = load_config(PipelineConfig, REPO / "configs" / name)
    rl = cfg.rl
    assert (rl.max_turns, rl.gamma, rl.repetition_penalty, rl.steps) == (5, 0.5, 0.5, 200)
    assert (rl.problems_per_step, rl.group_size, rl.lr, rl.kl_coef) == (8, 16, 1e-6, 0.001)
    assert (rl.clip_low, rl.clip_high, rl.max_new_tokens) == (0.2, 0.28, 400)
    assert cfg.sft.model.init == "pretrained" and cfg.sft.model.name_or_path.startswith("Qwen/Qwen2.5-")
    assert cfg.sft.model.trust_remote_code is False
    for src in cfg.curate.sources:
        path = getattr(src, "path", None)
        if path is not None:  # a path the user passes ($UFO_DATA): never this checkout's neighbours
            assert path.startswith(("/", "${UFO_DATA}/")) and not path.startswith(str(REPO.parent)), path
            assert "shared" not in path and ".." not in path, path


def test_pretrained_weights_load_from_safetensors_only(tiny_chat, tmp_path):
    model, fmt, _ = tiny_chat
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickled weights only
    fmt.tokenizer.save_pretrained(tmp_path)
    from stages.common.model import load_pretrained

    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load_pretrained(tmp_path, CPU)
