"""The RL math as small pure functions, each checked against hand-computed values in tests/.

Shapes: B = sequences (episodes) in the batch, L = tokens per sequence minus one (the positions that
predict a next token), P = problems, G = episodes per problem (group_size), V = vocabulary.
Position j of every [B, L] tensor is about token j+1: its log-probability, the value of the state
that predicts it, its reward. `response_mask[b, j]` is 1 when token j+1 was sampled by the policy.
"""

from __future__ import annotations

import torch

# --- reductions and estimators ---------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1 (token-level mean, as in DAPO §3.3).

    Every generated token weighs the same, whichever episode it is in; a zero mask gives 0, not NaN.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked positions; masked-out positions come back as 0.

    PPO normalises its advantages over the batch this way (OpenAI baselines `ppo2`; verl `masked_whiten`).
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked tokens: 1 = the critic predicts the returns,
    0 = no better than their mean, < 0 = worse (the diagnostic of cleanrl's PPO and verl's critic)."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_err = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return 1.0 - var_err / var_returns.clamp(min=1e-8)


def group_advantages(returns: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each episode's return relative to the other episodes of the same problem.

    DeepSeekMath §4.1.2 (outcome supervision): A_i = (R_i - mean(R)) / std(R) over the group. With
    `scale=False` only the mean is removed (Dr. GRPO, Liu et al. 2025, drops the std division).
    Args:
        returns: [P, G] episode returns.
    Returns:
        [P, G] advantages; a group whose returns are all equal gets 0 (it carries no signal).
    """
    # float64: a float32 mean of equal non-dyadic returns (e.g. -0.4) is off by an ulp, and dividing
    # by std (~ulp) + eps would blow that up into a spurious advantage shared by the whole group.
    r = returns.double()  # [P, G]
    centered = r - r.mean(dim=1, keepdim=True)  # [P, G]
    if scale:
        centered = centered / (r.std(dim=1, keepdim=True, unbiased=False) + eps)  # [P, G]
    return centered.to(returns.dtype)


def keep_spread_groups(returns: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """The paper code's rollout filter (RAGEN `_filter_rollout`, type "std"): keep the int(f * P) prompt
    groups whose returns spread the most (sample std); the others teach little (equal returns give GRPO
    no signal at all). Ties go to the earlier group, so the choice is deterministic.

    Args: returns: [P, G]. Returns: [K] sorted indices of the kept groups, K = int(keep_fraction * P).
    """
    num_keep = int(keep_fraction * returns.shape[0])
    if num_keep >= returns.shape[0]:
        return torch.arange(returns.shape[0])
    spread = returns.double().std(dim=1)  # [P]
    # stable descending sort: equal spreads keep their original order
    order = torch.sort(spread, descending=True, stable=True).indices  # [P]
    return order[:num_keep].sort().values  # [K]


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - lp) - (ref - lp) - 1 (Schulman, "Approximating
    KL Divergence", 2020): unbiased for samples from pi, always >= 0, low variance.

    Args: logprobs, ref_logprobs: [B, L]. Returns: [B, L].
    """
    log_ratio = ref_logprobs - logprobs  # [B, L]
    return log_ratio.exp() - log_ratio - 1.0


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis: logsumexp(z) - sum(softmax(z) * z).

    Args: logits: [..., V] (already divided by the sampling temperature). Returns: [...].
    """
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


# --- rewards and advantages per token --------------------------------------------------------------


def last_token_rewards(returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each episode's scalar return on its last generated token, zeros elsewhere (the outcome
    reward of PPO for LMs: Ouyang et al. 2022; verl puts the score at the last response position).

    Args: returns: [B]; response_mask: [B, L] with at least one 1 per row. Returns: [B, L].
    """
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)  # [L]
    last = (positions * (response_mask > 0)).argmax(dim=1)  # [B] index of the last generated token
    rewards = torch.zeros(response_mask.shape, dtype=returns.dtype, device=returns.device)  # [B, L]
    rewards[torch.arange(len(returns)), last] = returns
    return rewards


def kl_penalty_rewards(old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
                       kl_coef: float) -> torch.Tensor:
    """KL to the reference as a per-token reward, -kl_coef * (log pi_old - log pi_ref) on generated tokens
    (the k1 estimate; Ziegler et al. 2019 §2.2, verl `apply_kl_penalty` with kl_penalty="kl").

    Args: old_logprobs, ref_logprobs: [B, L] at rollout time; response_mask: [B, L]. Returns: [B, L].
    """
    return -kl_coef * (old_logprobs - ref_logprobs) * response_mask.to(old_logprobs.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over generated tokens only.

    The recursion runs right to left over the positions where `response_mask` is 1 and steps over the
    others: question, feedback and template tokens get no value, reward or advantage, and the last
    generated token of turn t links straight to the first generated token of turn t+1, as if the
    environment's tokens were part of the transition (the multi-turn fix of slime PR #1827; verl's
    multi-turn GAE). The last generated token of an episode is terminal (next value 0).

        delta_j = r_j + gamma * V_next(j) - V_j
        A_j     = delta_j + gamma * lam * A_next(j)
    where next(j) is the next generated position after j. returns_j = A_j + V_j (the critic's target).

    Args:
        rewards, values: [B, L]; entries at masked-out positions are ignored.
        response_mask: [B, L] 1 on generated tokens.
    Returns:
        (advantages [B, L], returns [B, L]), both 0 at masked-out positions.
    """
    mask = response_mask.to(values.dtype)
    advantages = torch.zeros_like(values)  # [B, L]
    next_value = torch.zeros_like(values[:, 0])  # [B] value of the next generated position
    next_advantage = torch.zeros_like(values[:, 0])  # [B]
    for j in reversed(range(values.shape[1])):
        m = mask[:, j]  # [B]
        delta = rewards[:, j] + gamma * next_value - values[:, j]  # [B]
        adv = delta + gamma * lam * next_advantage  # [B]
        advantages[:, j] = adv * m
        # carry through masked positions unchanged: they are not steps of the decision process
        next_value = torch.where(m > 0, values[:, j], next_value)
        next_advantage = torch.where(m > 0, adv, next_advantage)
    returns = (advantages + values) * mask  # [B, L]
    return advantages, returns


# --- losses ----------------------------------------------------------------------------------------


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token, with asymmetric clipping ("clip-higher", DAPO §3.1).

    loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A),  r = exp(logprobs - old_logprobs).
    Args:
        logprobs, old_logprobs: [B, L] log-probabilities of the sampled tokens now / at rollout time.
        advantages: [B, L] (an episode's advantage broadcast over its tokens, or GAE's per token).
    Returns:
        ([B, L] per-token loss, [B, L] 1.0 where the clipped branch was taken).
    """
    ratio = (logprobs - old_logprobs).exp()  # [B, L]
    unclipped = ratio * advantages  # [B, L]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages  # [B, L]
    loss = -torch.minimum(unclipped, clipped)  # [B, L]
    return loss, (clipped < unclipped).to(loss.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (OpenAI baselines `ppo2`; verl `compute_value_loss`):

        0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), averaged over generated tokens.
    The critic may not move a value more than `clip` from its rollout-time estimate in one update.

    Args: values (with grad), old_values, returns: [B, L]; response_mask: [B, L].
    Returns: (scalar loss, scalar fraction of tokens where the clipped branch was larger).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)  # [B, L]
    err = (values - returns) ** 2  # [B, L]
    err_clipped = (clipped_values - returns) ** 2  # [B, L]
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), response_mask)
    return loss, masked_mean((err_clipped > err).to(values.dtype), response_mask)


def policy_objective(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                     advantages: torch.Tensor, response_mask: torch.Tensor, *, clip_low: float, clip_high: float,
                     kl_coef: float, entropy: torch.Tensor | None = None,
                     entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor's loss shared by GRPO and PPO: clipped surrogate + kl_coef * k3 KL to the reference
    - entropy_coef * entropy, averaged over generated tokens only.

    Args:
        logprobs, old_logprobs: [B, L]; ref_logprobs: [B, L] or None when kl_coef == 0.
        advantages: [B, L]. response_mask: [B, L]. entropy: [B, L] policy entropy per position, or None.
    Returns:
        (scalar loss, detached stats for logging).
    """
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy")
    pg, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)  # [B, L]
    per_token = pg
    kl = torch.zeros_like(pg)  # [B, L]
    if kl_coef > 0:
        kl = kl_k3(logprobs, ref_logprobs)  # [B, L]
        per_token = per_token + kl_coef * kl
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy  # a bonus: higher entropy lowers the loss
    loss = masked_mean(per_token, response_mask)
    stats = {
        "loss/policy": masked_mean(pg, response_mask).detach(),
        "loss/kl": masked_mean(kl, response_mask).detach(),
        "loss/clip_fraction": masked_mean(clipped, response_mask).detach(),
    }
    if entropy is not None:
        stats["loss/entropy"] = masked_mean(entropy, response_mask).detach()
    return loss, stats


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, response_mask: torch.Tensor, *, clip_low: float, clip_high: float,
              kl_coef: float, entropy: torch.Tensor | None = None,
              entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (DeepSeekMath eq. 3): one group-relative advantage per episode, broadcast over its
    generated tokens, in the clipped surrogate + KL (+ entropy bonus) of `policy_objective`.

    Args:
        logprobs, old_logprobs, ref_logprobs: [B, L]; ref_logprobs may be None when kl_coef == 0.
        advantages: [B] one per episode. response_mask: [B, L], 1 on tokens the model generated.
    Returns:
        (scalar loss, detached stats for logging).
    """
    adv = advantages[:, None].expand_as(logprobs)  # [B, L]
    loss, stats = policy_objective(logprobs, old_logprobs, ref_logprobs, adv, response_mask, clip_low=clip_low,
                                   clip_high=clip_high, kl_coef=kl_coef, entropy=entropy, entropy_coef=entropy_coef)
    stats["loss/total"] = loss.detach()
    return loss, stats


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
             advantages: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
             response_mask: torch.Tensor, *, clip_low: float, clip_high: float, kl_coef: float, value_clip: float,
             value_loss_coef: float, entropy: torch.Tensor | None = None,
             entropy_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO with a learned critic (Schulman et al. 2017; Ouyang et al. 2022 for LMs): the actor's clipped
    surrogate on per-token GAE advantages + value_loss_coef * the clipped value loss.

    The two terms come back apart: a separate critic trains in its own engine, so each term goes to the
    backward of the engine whose weights it depends on (their sum is the PPO loss, `loss/total`).

    Args:
        logprobs, old_logprobs, ref_logprobs: [B, L]; advantages: [B, L] from `gae` (whitened or not).
        values: [B, L] the critic now (with grad); old_values: [B, L] at rollout time; returns: [B, L]
        the critic's targets from `gae`. response_mask: [B, L].
    Returns:
        (scalar actor loss, scalar value_loss_coef * value loss, detached stats for logging).
    """
    actor, stats = policy_objective(logprobs, old_logprobs, ref_logprobs, advantages, response_mask,
                                    clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef, entropy=entropy,
                                    entropy_coef=entropy_coef)
    critic, critic_clipped = value_loss(values, old_values, returns, response_mask, value_clip)
    weighted = value_loss_coef * critic
    stats |= {"loss/value": critic.detach(), "loss/value_clip_fraction": critic_clipped.detach(),
              "loss/total": (actor + weighted).detach()}
    return actor, weighted, stats


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token under `logits / temperature` (the sampling distribution).

    Args: logits: [B, L+1, V] from the model on input_ids: [B, L+1]. Returns: [B, L].
    """
    logits = logits[:, :-1].float() / temperature  # [B, L, V]
    targets = input_ids[:, 1:]  # [B, L]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # [B, L]
