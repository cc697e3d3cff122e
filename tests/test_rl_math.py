"""The RL math of stages/rl/losses.py against values worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch
from torch.testing import assert_close

from stages.rl.losses import (
    clipped_policy_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    grpo_loss,
    keep_spread_groups,
    kl_k3,
    kl_penalty_rewards,
    last_token_rewards,
    masked_mean,
    masked_whiten,
    policy_objective,
    ppo_loss,
    token_logprobs,
    value_loss,
)

LN2 = math.log(2.0)
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # ratio range [0.8, 1.28]


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# --- masked_mean -------------------------------------------------------------------------------------


def test_masked_mean_averages_masked_tokens_only():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [0, 1, 0]])
    # (1 + 2 + 5) / 3 tokens = 8/3
    assert masked_mean(values, mask).item() == pytest.approx(8 / 3)


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    out = masked_mean(t([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2))
    assert not torch.isnan(out)
    assert out.item() == 0.0


def test_masked_mean_ignores_huge_values_at_padded_positions():
    values = t([[1.0, 1e30], [-1e30, 3.0]])
    mask = torch.tensor([[1, 0], [0, 1]])  # integer mask, as collate builds it
    # (1 + 3) / 2 = 2; the +-1e30 pads are multiplied by 0
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


# --- group_advantages --------------------------------------------------------------------------------


def test_group_advantages_normalise_each_group_by_its_population_std():
    returns = t([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    # row 0: mean 2, deviations (-1, 0, 1), var = (1 + 0 + 1)/3 = 2/3, std = sqrt(2/3)
    #        -> (-1, 0, 1) / sqrt(2/3) = (-sqrt(1.5), 0, sqrt(1.5)) = (-1.224745, 0, 1.224745)
    # row 1: mean 1, deviations (-1, -1, 2), var = (1 + 1 + 4)/3 = 2, std = sqrt(2)
    #        -> (-1/sqrt2, -1/sqrt2, 2/sqrt2) = (-0.707107, -0.707107, 1.414214)
    expected = t([[-1.224745, 0.0, 1.224745], [-0.707107, -0.707107, 1.414214]])
    # eps = 1e-6 in the denominator moves these by ~1e-6 relative
    assert_close(group_advantages(returns), expected, rtol=0, atol=1e-5)


def test_group_with_equal_returns_gets_exactly_zero_advantage():
    # a group where every episode has the same return carries no signal; 0.0625 = 0.5**4 is exact in binary
    returns = t([[0.0625, 0.0625, 0.0625], [1.0, 2.0, 3.0]])
    adv = group_advantages(returns)
    assert torch.equal(adv[0], torch.zeros(3))
    assert adv[1].abs().sum() > 1.0  # the other group still gets a signal


def test_group_of_eight_equal_realistic_returns_gets_zero_advantage():
    # 8 episodes that all fail, each repeating one answer 5 times: return = 0 - 0.5*(1 - 1/5) = -0.4 each,
    # built the way stages.rl.episode_returns builds it (torch.tensor of Python floats -> float32)
    returns = torch.tensor([[-0.4] * 8])
    assert_close(group_advantages(returns), torch.zeros(1, 8), rtol=0, atol=1e-6)


def test_group_advantages_without_scaling_only_centre():
    returns = t([[1.0, 2.0, 6.0]])
    # mean = 9/3 = 3 -> (1-3, 2-3, 6-3) = (-2, -1, 3), no division by std (which is sqrt(14/3) != 1)
    assert_close(group_advantages(returns, scale=False), t([[-2.0, -1.0, 3.0]]))


# --- kl_k3 -------------------------------------------------------------------------------------------


def test_kl_k3_values():
    logprobs = t([[0.0, LN2, -1.0]])
    ref = t([[LN2, 0.0, -1.0]])
    # r = ref - lp:
    #   r = ln2  -> e^ln2 - ln2 - 1 = 2 - 0.693147 - 1 = 0.306853
    #   r = -ln2 -> e^-ln2 + ln2 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    #   r = 0    -> 1 - 0 - 1 = 0
    assert_close(kl_k3(logprobs, ref), t([[0.306853, 0.193147, 0.0]]))


def test_kl_k3_is_zero_for_equal_inputs_and_never_negative():
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 16, generator=gen) * 5
    assert torch.equal(kl_k3(lp, lp), torch.zeros(4, 16))
    ref = -torch.rand(4, 16, generator=gen) * 5
    assert (kl_k3(lp, ref) >= 0).all()


# --- clipped_policy_loss -----------------------------------------------------------------------------


def test_clipped_policy_loss_per_branch():
    ratio = t([[1.1, 1.5, 0.5, 1.5, 0.5]])
    adv = t([[2.0, 1.0, -1.0, -1.0, 1.0]])
    old = torch.zeros(1, 5)
    loss, clipped = clipped_policy_loss(ratio.log(), old, adv, CLIP_LOW, CLIP_HIGH)
    # range [0.8, 1.28]; loss = -min(r*A, clip(r)*A)
    # r=1.1, A=+2 : inside, both branches 2.2                    -> -2.2,  not clipped
    # r=1.5, A=+1 : min(1.5, 1.28) = 1.28 (clipped)              -> -1.28, clipped
    # r=0.5, A=-1 : min(-0.5, 0.8*-1 = -0.8) = -0.8 (clipped)    -> 0.8,   clipped
    # r=1.5, A=-1 : min(-1.5, 1.28*-1 = -1.28) = -1.5 (unclipped)-> 1.5,   not clipped
    # r=0.5, A=+1 : min(0.5, 0.8) = 0.5 (unclipped)              -> -0.5,  not clipped
    assert_close(loss, t([[-2.2, -1.28, 0.8, 1.5, -0.5]]))
    assert_close(clipped, t([[0.0, 1.0, 1.0, 0.0, 0.0]]))


# --- grpo_loss ---------------------------------------------------------------------------------------

# B=2, L=3. old logprobs are -1, logprobs = old + ln(ratio).
RATIO = [[1.0, 1.5, 3.0], [5.0, 0.5, 1.2]]
ADV = [1.0, -0.5]
MASK = [[1, 1, 0], [0, 1, 1]]
# ref - logprobs per token (the masked-out ones are arbitrary)
REF_MINUS_LP = [[0.0, LN2, 2.0], [-3.0, -LN2, 0.0]]
KL_COEF = 0.1


def _grpo_inputs():
    old = torch.full((2, 3), -1.0)
    lp = (old + t(RATIO).log()).requires_grad_(True)
    ref = lp.detach() + t(REF_MINUS_LP)
    return lp, old, ref, t(ADV), torch.tensor(MASK)


def test_grpo_loss_is_masked_token_mean_of_pg_plus_kl():
    lp, old, ref, adv, mask = _grpo_inputs()
    loss, stats = grpo_loss(lp, old, ref, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=KL_COEF)
    # masked-in tokens (4 of them):
    #   (0,0) r=1.0, A=+1  : pg = -1.0                      k3(r=0)    = 0
    #   (0,1) r=1.5, A=+1  : pg = -1.28 (clipped)           k3(r=ln2)  = 1 - ln2
    #   (1,1) r=0.5, A=-.5 : pg = -min(-.25, -.4) = 0.4 (cl) k3(r=-ln2) = ln2 - 0.5
    #   (1,2) r=1.2, A=-.5 : pg = 0.6                       k3(r=0)    = 0
    # sum pg = -1 - 1.28 + 0.4 + 0.6 = -1.28 ; sum k3 = (1 - ln2) + (ln2 - 0.5) = 0.5
    # total = (-1.28 + 0.1 * 0.5) / 4 = -1.23 / 4 = -0.3075
    assert loss.item() == pytest.approx(-0.3075, abs=1e-6)
    assert stats["loss/total"].item() == pytest.approx(-0.3075, abs=1e-6)
    assert stats["loss/policy"].item() == pytest.approx(-1.28 / 4, abs=1e-6)  # -0.32
    assert stats["loss/kl"].item() == pytest.approx(0.5 / 4, abs=1e-6)  # 0.125
    assert stats["loss/clip_fraction"].item() == pytest.approx(2 / 4)  # (0,1) and (1,1)


def test_grpo_loss_gradient_is_hand_computed_and_zero_at_masked_positions():
    lp, old, ref, adv, mask = _grpo_inputs()
    loss, _ = grpo_loss(lp, old, ref, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=KL_COEF)
    loss.backward()
    # d/dlp of (pg + 0.1*k3)/4, with d(-r*A)/dlp = -r*A (unclipped), 0 (clipped),
    # and dk3/dlp = 1 - e^(ref-lp):
    #   (0,0): (-1*1   + 0.1*(1-1))   / 4 = -0.25
    #   (0,1): (0      + 0.1*(1-2))   / 4 = -0.025
    #   (1,1): (0      + 0.1*(1-0.5)) / 4 = 0.0125
    #   (1,2): (-1.2*-0.5 + 0.1*(1-1)) / 4 = 0.6 / 4 = 0.15
    #   (0,2), (1,0): masked out -> 0
    expected = t([[-0.25, -0.025, 0.0], [0.0, 0.0125, 0.15]])
    assert_close(lp.grad, expected)
    assert lp.grad[0, 2].item() == 0.0 and lp.grad[1, 0].item() == 0.0  # exactly, not just close


def test_grpo_loss_does_not_see_masked_out_logprobs():
    lp, old, ref, adv, mask = _grpo_inputs()
    base, _ = grpo_loss(lp, old, ref, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=KL_COEF)
    moved = lp.detach().clone()
    moved[0, 2] += 7.0  # ratio e^7 on a masked-out token
    moved[1, 0] -= 9.0
    moved.requires_grad_(True)
    loss, _ = grpo_loss(moved, old, ref, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=KL_COEF)
    assert loss.item() == base.item()
    loss.backward()
    assert moved.grad[0, 2].item() == 0.0 and moved.grad[1, 0].item() == 0.0


@pytest.mark.parametrize("with_ref", [False, True])
def test_grpo_loss_without_kl_is_the_policy_term(with_ref):
    lp, old, ref, adv, mask = _grpo_inputs()
    loss, stats = grpo_loss(lp, old, ref if with_ref else None, adv, mask,
                            clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=0.0)
    # sum pg over masked tokens = -1.28 (see above) -> -1.28 / 4 = -0.32, no KL term
    assert loss.item() == pytest.approx(-0.32, abs=1e-6)
    assert stats["loss/kl"].item() == 0.0


# --- token_logprobs ----------------------------------------------------------------------------------


def _logits_and_ids():
    logits = t([[[0.0, LN2, 0.0],  # exp -> (1, 2, 1), sum 4 -> probs (1/4, 1/2, 1/4)
                 [math.log(3.0), 0.0, 0.0],  # exp -> (3, 1, 1), sum 5 -> probs (3/5, 1/5, 1/5)
                 [100.0, -100.0, 0.0]]])  # last position predicts past the end: unused
    input_ids = torch.tensor([[2, 1, 0]])  # targets = ids[1:] = (1, 0)
    return logits, input_ids


def test_token_logprobs_picks_the_next_token_log_softmax():
    logits, ids = _logits_and_ids()
    # position 0 -> token 1: ln(1/2) = -0.693147 ; position 1 -> token 0: ln(3/5) = -0.510826
    assert_close(token_logprobs(logits, ids), t([[-0.693147, -0.510826]]))


def test_token_logprobs_divides_logits_by_temperature():
    logits, ids = _logits_and_ids()
    # T=2 halves the logits:
    # position 0: (0, ln2/2, 0) -> exp (1, sqrt2, 1) -> p(1) = sqrt2/(2+sqrt2) = sqrt2 - 1 = 0.414214
    # position 1: (ln3/2, 0, 0) -> exp (sqrt3, 1, 1) -> p(0) = sqrt3/(sqrt3+2) = 1.732051/3.732051 = 0.464102
    expected = t([[math.log(0.414214), math.log(0.464102)]])  # (-0.881374, -0.767664)
    assert_close(token_logprobs(logits, ids, temperature=2.0), expected)


# --- GAE over generated tokens -----------------------------------------------------------------------

GAMMA, LAM = 0.9, 0.8  # gamma * lam = 0.72


def test_gae_single_turn_by_hand():
    values = t([[0.5, 0.6, 0.7]])
    rewards = t([[0.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), GAMMA, LAM)
    # j=2 (terminal): delta = 1 + 0.9*0 - 0.7 = 0.3                      A2 = 0.3
    # j=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03 ; A1 = 0.03 + 0.72*0.3     = 0.246
    # j=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04 ; A0 = 0.04 + 0.72*0.246   = 0.21712
    assert_close(adv, t([[0.21712, 0.246, 0.3]]))
    assert_close(ret, t([[0.71712, 0.846, 1.0]]))  # returns = A + V


def test_gae_steps_over_feedback_tokens_between_two_turns():
    """Turn 0 generated 2 tokens, then 3 template/feedback tokens (mask 0), then turn 1 generated 2 tokens.
    The masked tokens get no advantage and no return, and their values (9) and rewards (5) are never read:
    turn 0's last token links straight to turn 1's first."""
    mask = t([[1, 1, 0, 0, 0, 1, 1]])
    values = t([[0.5, 0.6, 9.0, 9.0, 9.0, 0.7, 0.8]])
    rewards = t([[0.0, 0.0, 5.0, 5.0, 5.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    # j=6 (terminal): delta = 1 - 0.8 = 0.2                                        A6 = 0.2
    # j=5: delta = 0.9*0.8 - 0.7 = 0.02 ; A5 = 0.02 + 0.72*0.2                     = 0.164
    # j=4,3,2: masked -> 0; the next value seen from j=1 is V5 = 0.7, the next advantage A5 = 0.164
    # j=1: delta = 0.9*0.7 - 0.6 = 0.03 ; A1 = 0.03 + 0.72*0.164 = 0.03 + 0.11808  = 0.14808
    # j=0: delta = 0.9*0.6 - 0.5 = 0.04 ; A0 = 0.04 + 0.72*0.14808 = 0.04 + 0.1066176 = 0.1466176
    assert_close(adv, t([[0.1466176, 0.14808, 0.0, 0.0, 0.0, 0.164, 0.2]]))
    assert_close(ret, t([[0.6466176, 0.74808, 0.0, 0.0, 0.0, 0.864, 1.0]]))
    # the same numbers as GAE on the generated tokens alone, the masked ones cut out
    dense_adv, _ = gae(t([[0.0, 0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7, 0.8]]), torch.ones(1, 4), GAMMA, LAM)
    assert_close(adv[mask.bool()], dense_adv[0])


def test_gae_with_gamma_and_lambda_one_is_return_minus_value():
    # the paper code's setting (gamma = lambda = 1): A_j = R - V_j for every generated token, padding after
    mask = t([[1, 0, 1, 1, 0, 0]])
    values = t([[0.25, 3.0, 0.5, -0.5, 7.0, 7.0]])
    rewards = last_token_rewards(t([2.0]), mask)  # R = 2 on the token at index 3
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert_close(adv, t([[1.75, 0.0, 1.5, 2.5, 0.0, 0.0]]))
    assert_close(ret, t([[2.0, 0.0, 2.0, 2.0, 0.0, 0.0]]))


def test_last_token_rewards_place_the_return_on_the_last_generated_token():
    mask = t([[0, 1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    out = last_token_rewards(t([2.0, -0.4]), mask)
    expected = torch.zeros(2, 7)
    expected[0, 4], expected[1, 1] = 2.0, -0.4  # last 1 of row 0 at index 4, of row 1 at index 1
    assert torch.equal(out, expected)


def test_kl_penalty_rewards_are_k1_on_generated_tokens():
    old, ref = t([[-1.0, -2.0, -3.0]]), t([[-1.5, -1.0, 0.0]])
    # -0.1 * (old - ref): (-0.1 * 0.5, -0.1 * -1.0, masked) = (-0.05, 0.1, 0)
    assert_close(kl_penalty_rewards(old, ref, t([[1, 1, 0]]), 0.1), t([[-0.05, 0.1, 0.0]]))


# --- PPO: value loss, whitening, explained variance, the combined loss --------------------------------


def test_value_loss_clips_moves_beyond_the_range():
    values = t([[1.0, 2.0, 3.0, 0.0]]).requires_grad_(True)
    old = t([[0.5, 2.5, 1.0, 0.0]])
    returns = t([[2.0, 1.0, 2.0, 1.0]])
    mask = t([[1, 1, 1, 0]])
    loss, clip_frac = value_loss(values, old, returns, mask, clip=0.2)
    # pos0: V moved +0.5 -> clipped V = 0.7 ; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> max 1.69 (clipped branch)
    # pos1: V moved -0.5 -> clipped V = 2.3 ; (2-1)^2 = 1, (2.3-1)^2 = 1.69 -> max 1.69 (clipped branch)
    # pos2: V moved +2.0 -> clipped V = 1.2 ; (3-2)^2 = 1, (1.2-2)^2 = 0.64 -> max 1    (unclipped)
    # loss = 0.5 * (1.69 + 1.69 + 1) / 3 = 0.73 ; clipped branch on 2 of 3 tokens
    assert loss.item() == pytest.approx(0.73, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)
    loss.backward()
    # the clipped branch is constant in V (V - old beyond the clamp): zero gradient at pos0 and pos1;
    # pos2: d/dV 0.5 * (V - R)^2 / 3 = (3 - 2) / 3
    assert_close(values.grad, t([[0.0, 0.0, 1 / 3, 0.0]]))


def test_masked_whiten_and_explained_variance():
    mask = t([[1, 1, 1, 0]])
    # mean 2, var (1 + 0 + 1)/3 = 2/3 -> (-1, 0, 1) / sqrt(2/3) = (-1.224745, 0, 1.224745); masked -> 0
    assert_close(masked_whiten(t([[1.0, 2.0, 3.0, 50.0]]), mask), t([[-1.224745, 0.0, 1.224745, 0.0]]))
    returns = t([[1.0, 2.0, 3.0, 9.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    # constant prediction: errors (-1, 0, 1), Var = 2/3 = Var(returns) -> 0
    assert explained_variance(t([[2.0, 2.0, 2.0, 0.0]]), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # errors (-0.5, 0, 0.5): Var = 1/6 -> 1 - (1/6)/(2/3) = 0.75
    assert explained_variance(t([[1.5, 2.0, 2.5, 0.0]]), returns, mask).item() == pytest.approx(0.75)


def test_ppo_loss_is_policy_objective_plus_weighted_value_loss():
    lp, old, ref, adv, mask = _grpo_inputs()
    token_adv = adv[:, None].expand(2, 3)  # the GRPO example's advantages, now per token
    values = torch.zeros(2, 3, requires_grad=True)
    returns = t([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    actor, critic, stats = ppo_loss(lp, old, ref, token_adv, values, values.detach(), returns, mask,
                                    clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=KL_COEF, value_clip=0.5,
                                    value_loss_coef=0.5)
    # actor part: -0.3075 (test_grpo_loss_is_masked_token_mean_of_pg_plus_kl)
    # value part: V = V_old = 0 (no clipping); masked squared errors 1, 4 | 1, 9 -> 0.5 * 15/4 = 1.875
    # total = -0.3075 + 0.5 * 1.875 = 0.63
    assert actor.item() == pytest.approx(-0.3075, abs=1e-6)
    assert critic.item() == pytest.approx(0.5 * 1.875)
    assert stats["loss/total"].item() == pytest.approx(0.63, abs=1e-6)
    assert stats["loss/value"].item() == pytest.approx(1.875)
    assert stats["loss/policy"].item() == pytest.approx(-0.32, abs=1e-6)


def test_entropy_from_logits_and_the_entropy_bonus():
    # probs (1/4, 1/2, 1/4): H = -(2 * 1/4 * ln(1/4) + 1/2 * ln(1/2)) = ln2 + ln2/2 = 1.5 ln2 = 1.039721
    assert entropy_from_logits(t([[0.0, LN2, 0.0]])).item() == pytest.approx(1.5 * LN2)
    # uniform over 4: H = ln 4
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    lp, old, ref, adv, mask = _grpo_inputs()
    ent = t([[1.0, 2.0, 100.0], [100.0, 3.0, 4.0]])  # masked positions hold 100: must not count
    base, _ = policy_objective(lp, old, ref, adv[:, None].expand(2, 3), mask, clip_low=CLIP_LOW,
                               clip_high=CLIP_HIGH, kl_coef=KL_COEF)
    bonus, stats = policy_objective(lp, old, ref, adv[:, None].expand(2, 3), mask, clip_low=CLIP_LOW,
                                    clip_high=CLIP_HIGH, kl_coef=KL_COEF, entropy=ent, entropy_coef=0.01)
    # masked mean entropy = (1 + 2 + 3 + 4) / 4 = 2.5 -> loss lower by 0.01 * 2.5 = 0.025
    assert bonus.item() == pytest.approx(base.item() - 0.025, abs=1e-6)
    assert stats["loss/entropy"].item() == pytest.approx(2.5)


# --- the rollout filter ------------------------------------------------------------------------------


def test_rollout_filter_keeps_the_groups_with_the_largest_spread():
    returns = t([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.5, 1.0]])
    # sample stds: 0, 0.57735, 0, 0.57735, 0.5
    assert keep_spread_groups(returns, 0.4).tolist() == [1, 3]  # int(0.4 * 5) = 2 groups
    assert keep_spread_groups(returns, 0.6).tolist() == [1, 3, 4]  # 3 groups
    assert keep_spread_groups(returns, 0.2).tolist() == [1]  # tie 1 vs 3: the earlier group
    assert keep_spread_groups(returns, 1.0).tolist() == [0, 1, 2, 3, 4]
