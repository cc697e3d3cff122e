"""Real ChatML templates: the tiny chat model's, and SmolLM2-135M-Instruct's own (its tokenizer and
template read from the GGUF file `make models` installs, with its default system prompt and without it,
as configs/smollm2-135m.yaml sets it). The feedback is ordinary text, episodes are the template's
own rendering token for token, and over 5 turns of a real rollout only sampled tokens carry loss."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from stages.common.base_model import gguf_path
from stages.common.chat import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, ChatFormat, Message
from stages.common.config import ConfigError, read_yaml
from stages.common.episodes import rollout
from stages.common.model_spec import ModelConfig
from stages.rl.batch import collate
from tests.helpers import FEEDBACK, REPO, multiplication_problems

SMOLLM2 = ModelConfig.model_validate(read_yaml(REPO / "configs" / "smollm2-135m.yaml")["sft"]["model"])


@functools.cache
def _smollm2_tokenizer():
    try:
        path = gguf_path(SMOLLM2.gguf)
    except ConfigError as err:
        pytest.fail(f"{err} (make test installs it; run `make models`)")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # ~3 s: read once


def smollm2_tokenizer(chat_template: str | None):
    """SmolLM2-135M-Instruct's own tokenizer and chat template, from the GGUF file of the package `make test`
    installs (`make models`); `chat_template` replaces the template as the config does."""
    tokenizer = copy.deepcopy(_smollm2_tokenizer())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module", params=["tiny_chatml", "smollm2", "smollm2_no_system"])
def chat(request):
    """A random policy with a real chat format: it answers garbage, so episodes run all 5 turns and exercise
    answers cut off without eos. `tiny_chatml`: a Qwen2 policy with the locally trained BPE tokenizer;
    `smollm2*`: a tiny random Llama over SmolLM2's real 49,152-token vocabulary and template (with its
    default system prompt, and without it as the config has it)."""
    if request.param == "tiny_chatml":
        return request.getfixturevalue("tiny_chat")
    problems = multiplication_problems()
    torch.manual_seed(0)
    tokenizer = smollm2_tokenizer(SMOLLM2.chat_template if request.param == "smollm2_no_system" else None)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    return model.eval(), ChatFormat(tokenizer, FEEDBACK), problems


def test_smollm2_template_as_read_from_its_gguf_file():
    """What the pipeline relies on in SmolLM2's own format: eos `<|im_end|>` (id 2) ends an answer, digits are
    single tokens, the feedback is ordinary text, and the config's template keeps ChatML without the default
    system prompt (34 tokens for the prompt of "47*6" with it, 13 without)."""
    tok = smollm2_tokenizer(None)
    assert (tok.eos_token, tok.eos_token_id) == (IM_END, 2)
    assert tok.encode("Hello world! 123", add_special_tokens=False) == [19556, 905, 17, 216, 33, 34, 35]
    fmt, short = ChatFormat(tok, FEEDBACK), ChatFormat(smollm2_tokenizer(SMOLLM2.chat_template), FEEDBACK)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(fmt.prompt_ids("47*6"))
    assert tok.decode(short.prompt_ids("47*6")) == f"{IM_START}user\n47*6{IM_END}\n{IM_START}assistant\n"
    assert (len(fmt.prompt_ids("47*6")), len(short.prompt_ids("47*6"))) == (34, 13)
    assert fmt.feedback_ids == short.feedback_ids
    assert tok.decode(fmt.feedback_ids) == f"\n{IM_START}user\n{FEEDBACK}{IM_END}\n{IM_START}assistant\n"


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


def test_five_turn_rollout_masks_on_the_chatml_template(chat):
    """Question, system and feedback tokens carry zero loss, every generated token carries loss, and the
    ids trained on are the ids sampled; the episode is the template's own rendering of the conversation."""
    model, fmt, problems = chat
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


def test_sft_chat_mask_trains_assistant_turns_only(chat):
    _, fmt, _ = chat
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


def test_ufo_sft_example_is_a_chat_with_the_final_answer_trained(chat):
    _, fmt, _ = chat
    ids, mask = fmt.sft_example("123*4", ["55", "7"], "492")
    tok = fmt.tokenizer
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == f"492{IM_END}"
    assert tok.decode(ids).count(FEEDBACK) == 2
