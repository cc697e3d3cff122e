"""The tiny chat model's real ChatML template: the feedback is ordinary text, episodes are the template's
own rendering token for token, and over 5 turns of a real rollout only sampled tokens carry loss."""

from __future__ import annotations

import pytest
import torch

from stages.common.chat import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, Message
from stages.common.episodes import rollout
from stages.rl.batch import collate
from tests.helpers import FEEDBACK


def _messages(question: str, replies: list[str]) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question}]
    for t, reply in enumerate(replies):
        if t:
            messages.append({"role": "user", "content": FEEDBACK})
        messages.append({"role": "assistant", "content": reply})
    return messages


def test_the_feedback_is_ordinary_text_of_a_chatml_user_turn(tiny_chat):
    _, fmt, _ = tiny_chat
    tok = fmt.tokenizer
    assert FEEDBACK not in tok.get_vocab() and len(tok.encode(FEEDBACK)) >= 4
    assert tok.decode(fmt.feedback_ids) == f"\n{IM_START}user\n{FEEDBACK}{IM_END}\n{IM_START}assistant\n"
    assert fmt.eos_id == tok.convert_tokens_to_ids(IM_END)
    prompt = tok.decode(fmt.prompt_ids("123*4"))
    assert prompt == (f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n123*4{IM_END}\n"
                      f"{IM_START}assistant\n")
    # Digits are single tokens (Qwen2's split), so every answer is digit-aligned.
    assert tok.convert_ids_to_tokens(tok.encode("1234")) == ["1", "2", "3", "4"]


def test_five_turn_rollout_masks_on_the_chatml_template(tiny_chat):
    """Question, system and feedback tokens carry zero loss, every generated token carries loss, and the
    ids trained on are the ids sampled; the episode is the template's own rendering of the conversation."""
    model, fmt, problems = tiny_chat
    torch.manual_seed(3)
    episodes = rollout(model, fmt, problems[:6], group_size=2, max_turns=5, temperature=1.0, max_new_tokens=6)
    assert all(e.num_turns == 5 for e in episodes), "a random policy should fail every turn"
    tok = fmt.tokenizer
    batch = collate(episodes, fmt.pad_id)  # whole episodes, no shared prefix: [B, W]
    targets = batch.input_ids[:, 1:]  # what each logprob position predicts  [B, L]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].requires_grad_(True)  # [B, L]
    (-(logprobs * batch.response_mask).sum()).backward()
    carries_loss = logprobs.grad != 0  # [B, L]
    for i, e in enumerate(episodes):
        ids, mask = e.token_ids(), e.response_mask()
        # 1. The episode is the template's rendering of the conversation, token for token.
        replies = [tok.decode(t.answer_ids[:-1] if t.answer_ids[-1:] == [fmt.eos_id] else t.answer_ids)
                   for t in e.turns]
        rendered = tok.apply_chat_template(_messages(e.problem.question, replies), tokenize=False)
        closed = e.turns[-1].answer_ids[-1:] == [fmt.eos_id]
        assert tok.decode(ids) + ("\n" if closed else f"{IM_END}\n") == rendered
        # 2. System prompt and question: zero loss.
        prompt = fmt.prompt_ids(e.problem.question)
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        assert not carries_loss[i, :len(prompt) - 1].any()
        # 3. Each feedback turn: zero loss; each sampled token: loss, and exactly the sampled id.
        pos = len(prompt)
        for t, turn in enumerate(e.turns):
            if t:
                ctx = turn.context_ids
                assert ctx[-len(fmt.feedback_ids):] == fmt.feedback_ids
                assert not any(mask[pos:pos + len(ctx)])
                assert not carries_loss[i, pos - 1:pos - 1 + len(ctx)].any()
                pos += len(ctx)
            n = len(turn.answer_ids)
            assert all(mask[pos:pos + n])
            assert carries_loss[i, pos - 1:pos - 1 + n].all()
            assert targets[i, pos - 1:pos - 1 + n].tolist() == turn.answer_ids
            pos += n
        assert pos == len(ids) and carries_loss[i, pos - 1:].sum() == 0  # padding carries nothing
        sampled = [x for t in e.turns for x in t.answer_ids]
        assert targets[i][batch.response_mask[i].bool()].tolist() == sampled


def test_sft_chat_mask_trains_assistant_turns_only(tiny_chat):
    _, fmt, _ = tiny_chat
    tok = fmt.tokenizer
    messages = [Message("system", "Answer with a number."), Message("user", "12*3"),
                Message("assistant", "35", train=False), Message("user", FEEDBACK), Message("assistant", "36"),
                Message("user", "and 12*4?"), Message("assistant", "48")]
    ids, mask = fmt.chat_ids(messages)
    rendered = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=False)
    assert tok.decode(ids) + "\n" == rendered
    assert "You are a helpful assistant." not in rendered  # an explicit system prompt replaces the default
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == f"36{IM_END}48{IM_END}"
    with pytest.raises(ValueError, match="must alternate"):
        fmt.chat_ids([Message("user", "a"), Message("user", "b")])


def test_ufo_sft_example_is_a_chat_with_the_final_answer_trained(tiny_chat):
    _, fmt, _ = tiny_chat
    ids, mask = fmt.sft_example("123*4", ["55", "7"], "492")
    tok = fmt.tokenizer
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == f"492{IM_END}"
    assert tok.decode(ids).count(FEEDBACK) == 2
