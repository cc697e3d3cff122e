"""The RL step's batching: length-bucketed micro-batches, gradient accumulation that does not change the
gradient, the skipped "old" forward that does not change the update, and the seeded problem order."""

from __future__ import annotations

import pytest
import torch

from stages.rl import Config
from stages.rl.batch import Batch, collate, micro_batches, padding_share, step_problems
from stages.rl.models import build_models, critic_values, score
from stages.rl.rewards import episode_return
from stages.rl.stage import assign_advantages, episode_returns, forward_all, update
from tests.helpers import multiplication_problems


def test_micro_batches_sort_by_length_and_minimise_slots_plus_calls():
    lengths = torch.tensor([5, 2, 9, 3, 3])
    rows = torch.arange(5)
    # sorted: rows 1 (2), 3 (3), 4 (3), 0 (5), 2 (9); budget 10 slots per micro-batch
    # call cost 0: cut wherever the length changes -> [2] [3,3] [5] [9], 22 slots, no padding
    assert [c.tolist() for c in micro_batches(lengths, rows, 10, call_cost=0)] == [[1], [3, 4], [0], [2]]
    # call cost 10: [2,3,3] [5] [9] = 9 + 5 + 9 slots + 3 calls * 10 = 53 beats the 4 calls above
    # (22 + 40 = 62); [2,3,3,5] would be 4 x 5 = 20 > 10 slots, over the budget
    chunks = micro_batches(lengths, rows, 10, call_cost=10)
    assert [c.tolist() for c in chunks] == [[1, 3, 4], [0], [2]]
    # slots 3*3 + 5 + 9 = 23, tokens 2+3+3+5+9 = 22 -> 1/23 padding; one tensor would be 5 x 9 = 45 slots
    assert padding_share(lengths, chunks) == pytest.approx(1 / 23)
    assert padding_share(lengths, [rows]) == pytest.approx(1 - 22 / 45)
    # a huge budget and call cost: one micro-batch
    assert [c.tolist() for c in micro_batches(lengths, rows, 1000, call_cost=1000)] == [[1, 3, 4, 0, 2]]
    # a row longer than the budget still gets a micro-batch of its own
    assert [c.tolist() for c in micro_batches(torch.tensor([4, 30]), torch.arange(2), 10)] == [[0], [1]]


def test_step_problems_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    problems = multiplication_problems(10)
    epoch = [p.id for s in range(1, 6) for p in step_problems(problems, seed=3, step=s, per_step=2)]
    assert sorted(epoch) == sorted(p.id for p in problems)  # 5 steps x 2 = one pass, no repeats
    assert [p.id for p in step_problems(problems, 3, 4, 2)] == epoch[6:8]  # same answer asked again, any order
    assert epoch != [p.id for s in range(1, 6) for p in step_problems(problems, 4, s, 2)]  # the seed matters
    crossing = step_problems(problems, 3, 6, 3)  # positions 15..17: epoch 1, another permutation
    assert len(crossing) == 3


def _prepared(cfg: Config, folder, fmt, episodes, *, old_forward: bool, shared: bool = False):
    torch.manual_seed(0)
    models = build_models(cfg, folder, torch.device("cpu"))
    batch = collate(episodes, fmt.pad_id, shared_prefix=shared)
    assert batch.has_prefix == shared
    chunks = micro_batches(batch.lengths, torch.arange(len(batch)), cfg.micro_batch_tokens, cfg.micro_batch_call_cost)
    cpu = torch.device("cpu")
    if models.reference is not None:
        batch.ref_logprobs = forward_all(models.reference, lambda mb, kv: score(models.reference, mb, 1.0, kv=kv).logprobs,
                                         batch, chunks, cpu)
    if old_forward:
        batch.old_logprobs = forward_all(models.policy, lambda mb, kv: score(models.policy, mb, 1.0, kv=kv).logprobs,
                                         batch, chunks, cpu)
    if models.critic is not None:
        batch.old_values = forward_all(models.value_prefix_model, lambda mb, kv: critic_values(models, mb, kv),
                                       batch, chunks, cpu)
    returns = torch.linspace(-1, 1, len(episodes))  # distinct returns: every group carries a signal
    assign_advantages(batch, returns, cfg)
    return models, batch


def _params(models) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in models.policy.parameters()]
    if models.critic is not None:
        out += [p.detach().clone() for p in models.critic.parameters()]
    return out


CASES = [dict(algorithm="grpo"), dict(algorithm="ppo", critic="separate"), dict(algorithm="ppo", critic="value_head")]


@pytest.mark.parametrize("kw", CASES, ids=["grpo", "ppo-separate", "ppo-value-head"])
def test_gradient_accumulation_over_micro_batches_matches_one_big_batch(tiny_rollout, kw):
    folder, fmt, episodes = tiny_rollout
    results = []
    for budget, call_cost in ((4096, 10**6), (60, 0)):  # one micro-batch vs one per distinct length
        cfg = Config(problems_per_step=4, group_size=4, minibatch_size=16, micro_batch_tokens=budget,
                     micro_batch_call_cost=call_cost, max_turns=3, max_new_tokens=6, max_prompt_tokens=12,
                     max_feedback_tokens=4, kl_coef=0.1, lr=1e-2, critic_lr=1e-2, **kw)
        models, batch = _prepared(cfg, folder, fmt, episodes, old_forward=False)
        if budget == 60:
            assert len(micro_batches(batch.lengths, torch.arange(len(batch)), budget)) >= 4
        before = _params(models)
        update(models, batch, cfg, torch.device("cpu"))
        after = _params(models)
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # something was learned
        results.append(after)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kw", CASES, ids=["grpo", "ppo-separate", "ppo-value-head"])
def test_skipping_the_old_forward_gives_the_same_update(tiny_rollout, kw):
    """One epoch, one minibatch: the detached log-probs of the update's own forward equal a separate
    pre-update forward, so skipping that forward changes nothing."""
    folder, fmt, episodes = tiny_rollout
    cfg = Config(problems_per_step=4, group_size=4, minibatch_size=16, max_turns=3, max_new_tokens=6,
                 kl_coef=0.1, lr=1e-2, critic_lr=1e-2, **kw)
    assert cfg.skips_old_forward
    results = []
    for old_forward in (True, False):
        models, batch = _prepared(cfg, folder, fmt, episodes, old_forward=old_forward)
        stats = update(models, batch, cfg, torch.device("cpu"))
        assert stats["loss/clip_fraction"] == 0.0  # ratio exactly 1 in both cases
        results.append(_params(models))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", CASES, ids=["grpo", "ppo-separate", "ppo-value-head"])
def test_shared_prefixes_give_the_same_scores_and_update(tiny_rollout, kw):
    """Each prompt run once for its group (Prefix Grouper) vs every episode in full: the same reference
    log-probs and critic values at every generated token, and the same parameters after the update."""
    folder, fmt, episodes = tiny_rollout
    cfg = Config(problems_per_step=4, group_size=4, minibatch_size=8, ppo_epochs=2, max_turns=3, max_new_tokens=6,
                 max_prompt_tokens=12, max_feedback_tokens=4, micro_batch_tokens=60, micro_batch_call_cost=0,
                 kl_coef=0.1, lr=1e-2, critic_lr=1e-2, **kw)  # 2 epochs x 2 minibatches x several micro-batches
    results = []
    for shared in (False, True):
        models, batch = _prepared(cfg, folder, fmt, episodes, old_forward=True, shared=shared)
        if shared:  # 4 prompts, each once, instead of 16 times; every row's suffix is shorter
            assert batch.prefix_ids.shape[0] == 4 and batch.prefix_ids.shape[1] > 3
        where = batch.response_mask.bool()
        scores = [batch.ref_logprobs[where], batch.old_logprobs[where]]
        if batch.old_values is not None:
            scores.append(batch.old_values[where])
        torch.manual_seed(1)  # the same minibatch order
        update(models, batch, cfg, torch.device("cpu"))
        results.append((scores, _params(models)))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_old_forward_runs_when_it_is_not_redundant():
    base = dict(problems_per_step=4, group_size=4, max_turns=3, max_new_tokens=6)
    assert Config(**base, minibatch_size=16).skips_old_forward
    assert not Config(**base, minibatch_size=8).skips_old_forward  # two optimizer steps per rollout
    assert not Config(**base, minibatch_size=16, ppo_epochs=2).skips_old_forward
    assert not Config(**base, minibatch_size=16, kl_mode="reward").skips_old_forward  # needed before the update
    assert Config(**base, minibatch_size=16, kl_mode="reward", kl_coef=0.0).skips_old_forward


def test_collated_rows_are_trimmed_to_their_own_longest_episode(tiny_rollout):
    _, fmt, episodes = tiny_rollout
    batch = collate(episodes, fmt.pad_id)
    shortest = torch.argsort(batch.lengths)[:3]
    mb = batch.rows(shortest)
    width = int(batch.lengths[shortest].max())
    assert mb.input_ids.shape == (3, width) and mb.response_mask.shape == (3, width - 1)
    for row, i in enumerate(shortest.tolist()):
        assert mb.input_ids[row, : batch.lengths[i]].tolist() == episodes[i].token_ids()
    # the engine's log-probs sit exactly on the generated positions
    assert torch.equal(batch.rollout_logprobs != 0, batch.response_mask.bool())


def test_episode_returns_follow_rollout_order(tiny_rollout):
    _, _, episodes = tiny_rollout
    cfg = Config(problems_per_step=4, group_size=4, minibatch_size=16)
    expected = [episode_return(e.solved_turn, e.num_distinct, e.num_turns, 0.5, 0.5) for e in episodes]
    assert episode_returns(episodes, cfg).tolist() == pytest.approx(expected)


def _hand_batch(old, ref, mask, values=None) -> Batch:
    mask = torch.tensor(mask)
    b = mask.shape[0]
    return Batch(input_ids=torch.zeros(b, mask.shape[1] + 1, dtype=torch.long), attention_mask=torch.ones(b, 4),
                 response_mask=mask, rollout_logprobs=torch.zeros(mask.shape), lengths=torch.full((b,), 4),
                 group=torch.zeros(b, dtype=torch.long), prefix_lens=torch.zeros(b, dtype=torch.long),
                 prefix_ids=torch.zeros(1, 0, dtype=torch.long), prefix_mask=torch.zeros(1, 0, dtype=torch.long),
                 old_logprobs=torch.tensor(old), ref_logprobs=torch.tensor(ref),
                 old_values=None if values is None else torch.tensor(values))


def test_kl_as_a_reward_term_enters_gae_per_token():
    batch = _hand_batch([[-1.0, -2.0, -3.0]], [[-1.5, 0.0, -2.0]], [[1, 0, 1]], values=[[0.2, 9.0, 0.5]])
    cfg = Config(algorithm="ppo", kl_mode="reward", kl_coef=0.1, gamma_gae=1.0, lambda_gae=1.0,
                 whiten_advantages=False, problems_per_step=1, group_size=2, minibatch_size=2)
    assign_advantages(batch, torch.tensor([1.0]), cfg)
    # rewards: -0.1 * (old - ref) on generated tokens = (-0.05, -, +0.1); the return 1.0 on the last one
    #          -> (-0.05, 0, 1.1)
    # GAE (gamma = lambda = 1), position 1 skipped: A2 = 1.1 - 0.5 = 0.6 ; A0 = -0.05 + 0.5 - 0.2 + 0.6 = 0.85
    torch.testing.assert_close(batch.advantages, torch.tensor([[0.85, 0.0, 0.6]]))
    torch.testing.assert_close(batch.returns, torch.tensor([[1.05, 0.0, 1.1]]))  # A + V


def test_kl_as_a_reward_term_shapes_grpo_returns():
    # two episodes of one problem, equal returns: only the KL charge tells them apart
    batch = _hand_batch([[-1.0, -3.0], [-1.0, -1.0]], [[-1.5, -2.0], [-1.0, -1.0]], [[1, 1], [1, 1]])
    cfg = Config(algorithm="grpo", kl_mode="reward", kl_coef=0.1, problems_per_step=1, group_size=2,
                 minibatch_size=2)
    assign_advantages(batch, torch.tensor([0.0, 0.0]), cfg)
    # episode 0 is charged -0.1 * ((-1 + 1.5) + (-3 + 2)) = -0.1 * -0.5 = +0.05; episode 1 nothing
    # group (0.05, 0): mean 0.025, population std 0.025 -> (+1, -1)
    torch.testing.assert_close(batch.advantages, torch.tensor([1.0, -1.0]), rtol=0, atol=1e-4)
