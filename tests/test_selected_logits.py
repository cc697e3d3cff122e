"""The output head on the positions that need it only (`stages.common.model.selected_logits`): the same
logits, SFT loss and gradients as the full forward, for a plain model, a LoRA-wrapped one and packed rows;
a model outside the plain-head list, or whose head is a negligible share of its weights, takes the full
forward. The tiny test model's head is such a share, so the tests of the selection itself lower the bar."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from stages.common import model as model_module
from stages.common.model import MIN_HEAD_SHARE, head_share, selected_logits
from stages.sft.batching import loss_share, pack_batch, pad_batch


def _examples(fmt, problems, n=6):
    out = []
    for i, p in enumerate(problems[:n]):
        wrong = [problems[i + 1].answer] if i % 2 else []
        ids, mask = fmt.sft_example(p.question, wrong, p.answer)
        out.append((ids, mask, len(wrong)))
    return out


@pytest.fixture
def selection_on(monkeypatch):
    """`selected_logits` selects on the tiny model too (its head is under MIN_HEAD_SHARE of its weights)."""
    monkeypatch.setattr(model_module, "MIN_HEAD_SHARE", 0.0)


def _lora(model):
    return get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))


@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_selected_logits_equal_the_full_forward(tiny, wrap, selection_on):
    model, fmt, problems = tiny
    model = _lora(model) if wrap == "lora" else model
    batch = pad_batch(_examples(fmt, problems), fmt.pad_id, torch.device("cpu"))
    where = batch["labels"][:, 1:] != -100  # [B, L-1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = model(**inputs).logits[:, :-1][where]
        sel = selected_logits(model, inputs, where)
    assert sel.shape == (int(where.sum()), full.shape[-1]) and where.sum() < where.numel() / 3
    torch.testing.assert_close(sel, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batching", ["pad", "pack"])
def test_sft_loss_and_gradients_equal_transformers_loss(tiny, batching, selection_on):
    model, fmt, problems = tiny
    examples = _examples(fmt, problems)
    batch = (pad_batch(examples, fmt.pad_id, torch.device("cpu")) if batching == "pad"
             else pack_batch(examples, fmt.pad_id, 128, torch.device("cpu")))
    targets = sum(sum(m[1:]) for _, m, _ in examples)
    ours, theirs = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    loss = loss_share(ours, [batch], targets)
    ref = theirs(**batch, use_cache=False, num_items_in_batch=targets).loss
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_outside_the_plain_head_list_takes_the_full_forward(tiny):
    model, fmt, problems = tiny

    class Capped(type(model)):  # e.g. a head with soft-capping after it: the fast path would be wrong
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    capped = copy.deepcopy(model)
    capped.__class__ = Capped
    batch = pad_batch(_examples(fmt, problems), fmt.pad_id, torch.device("cpu"))
    where = batch["labels"][:, 1:] != -100
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(selected_logits(capped, inputs, where),
                                   capped(**inputs).logits[:, :-1][where], rtol=0, atol=0)


def test_a_model_whose_head_is_a_negligible_share_takes_the_full_forward_bit_for_bit():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the tiny default's shape (configs/tiny.yaml): vocab 27, 2 layers of 128
    model = LlamaForCausalLM(LlamaConfig(vocab_size=27, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=160)).eval()
    assert 0 < head_share(model) < MIN_HEAD_SHARE
    ids = torch.randint(0, 27, (16, 60))
    where = torch.rand(16, 59) < 0.3
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ours, plain = copy.deepcopy(model), copy.deepcopy(model)
    selected_logits(ours, inputs, where).logsumexp(-1).sum().backward()
    plain(**inputs).logits[:, :-1][where].logsumexp(-1).sum().backward()
    # The gradients, not the logits, tell the paths apart: the head's weight gradient summed over the
    # selected rows only adds in another order (5.7e-6 apart here with the selection forced on).
    for (name, a), (_, b) in zip(ours.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_head_share_of_a_smollm2_shaped_model_counts_its_tied_head_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        smol = LlamaForCausalLM(config)
    # 49,152 x 576 = 28.3M of 134.5M weights (the embedding is the head)
    assert head_share(smol) == pytest.approx(49152 * 576 / 134_515_008, rel=1e-6)
