"""The core invariants of multi-turn RL: only generated tokens carry loss, and the update sees exactly
the token ids that were sampled."""

from __future__ import annotations

import torch

from stages.common.episodes import rollout
from stages.rl.batch import collate
from stages.rl.losses import grpo_loss
from stages.rl.models import score


def _episodes(tiny, temperature=1.0, turns=5):
    model, fmt, problems = tiny
    torch.manual_seed(1)
    return rollout(model, fmt, problems[:8], group_size=4, max_turns=turns, temperature=temperature, max_new_tokens=6)


def test_episode_ids_and_mask_rebuilt_from_pieces(tiny):
    _, fmt, _ = tiny
    episodes = _episodes(tiny)
    assert sum(e.num_turns == 5 for e in episodes) >= 8, "need several five-turn episodes"
    for e in episodes:
        # Expected layout, built independently from the template pieces and the sampled ids.
        ids = fmt.prompt_ids(e.problem.question)
        mask = [0] * len(ids)
        for t, turn in enumerate(e.turns):
            if t > 0:
                prev = e.turns[t - 1].answer_ids
                closing = [] if prev and prev[-1] == fmt.eos_id else [fmt.eos_id]
                piece = closing + fmt.feedback_ids
                ids, mask = ids + piece, mask + [0] * len(piece)
            ids, mask = ids + turn.answer_ids, mask + [1] * len(turn.answer_ids)
        assert e.token_ids() == ids
        assert e.response_mask() == mask


def test_question_and_feedback_tokens_carry_zero_loss_every_generated_token_carries_loss(tiny):
    _, fmt, _ = tiny
    episodes = _episodes(tiny)
    feedback_token = fmt.tokenizer.convert_tokens_to_ids(fmt.feedback)
    user_token = fmt.tokenizer.convert_tokens_to_ids("<|user|>")
    for e in episodes:
        ids, mask = e.token_ids(), e.response_mask()
        prompt_len = len(fmt.prompt_ids(e.problem.question))
        assert mask[:prompt_len] == [0] * prompt_len  # the question
        # One feedback turn (template, mask 0) after every wrong answer but the last. A random policy
        # may also SAMPLE these tokens; those are generated and rightly carry loss.
        template = [tok for tok, m in zip(ids, mask, strict=True) if m == 0]
        assert template.count(feedback_token) == e.num_turns - 1
        assert template.count(user_token) == e.num_turns
        sampled = [tok for t in e.turns for tok in t.answer_ids]
        assert [tok for tok, m in zip(ids, mask, strict=True) if m == 1] == sampled
        assert sum(mask) == sum(len(t.answer_ids) for t in e.turns)  # every sampled token, nothing else


def test_trained_ids_equal_sampled_ids(tiny):
    _, fmt, _ = tiny
    episodes = _episodes(tiny)
    batch = collate(episodes, fmt.pad_id)
    targets = batch.input_ids[:, 1:]  # what each logprob position predicts
    for i, e in enumerate(episodes):
        sampled = [tok for t in e.turns for tok in t.answer_ids]
        trained = targets[i][batch.response_mask[i].bool()].tolist()
        assert trained == sampled
        assert batch.attention_mask[i].sum() == len(e.token_ids())  # padding is not attended


def test_training_forward_reproduces_generation(tiny):
    """Greedy rollouts are left-padded by `generate`; the update forward is right-padded. At every
    generated position the training logits must pick the very token generation picked."""
    model, fmt, _ = tiny
    episodes = _episodes(tiny, temperature=0.0, turns=3)
    batch = collate(episodes, fmt.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    argmax = logits.argmax(-1)
    m = batch.response_mask.bool()
    assert torch.equal(argmax[m], batch.input_ids[:, 1:][m])


def test_loss_gradient_flows_only_through_generated_tokens(tiny):
    model, fmt, _ = tiny
    episodes = _episodes(tiny)
    adv = torch.linspace(-1, 1, len(episodes))
    batch = collate(episodes, fmt.pad_id)
    with torch.no_grad():
        old = score(model, batch, 1.0).logprobs
    logprobs = old.clone().requires_grad_(True)
    loss, _ = grpo_loss(logprobs, old, old.clone(), adv, batch.response_mask,
                        clip_low=0.2, clip_high=0.28, kl_coef=0.1)
    loss.backward()
    grad = logprobs.grad
    assert torch.all(grad[~batch.response_mask.bool()] == 0)
    has_adv = adv[:, None].expand_as(grad) != 0
    assert torch.all(grad[batch.response_mask.bool() & has_adv] != 0)


def test_sft_example_loss_mask_covers_final_answer_only(tiny):
    _, fmt, _ = tiny
    ids, mask = fmt.sft_example("123*4", ["55", "7"], "492")
    tokens = fmt.tokenizer.convert_ids_to_tokens(ids)
    trained = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert trained == ["4", "9", "2", "<|end|>"]
    assert tokens.count(fmt.feedback) == 2
