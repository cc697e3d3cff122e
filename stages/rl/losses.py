"""The RL math as small pure functions, each checked against hand-computed values in tests/.

Shapes: B = sequences (episodes) in the batch, L = tokens per sequence minus one (the positions that
predict a next token), P = problems, G = episodes per problem (group_size).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1 (token-level mean, as in DAPO §3.3).

    Every generated token weighs the same, whichever episode it is in; a zero mask gives 0, not NaN.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


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


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - lp) - (ref - lp) - 1 (Schulman, "Approximating
    KL Divergence", 2020): unbiased for samples from pi, always >= 0, low variance.

    Args: logprobs, ref_logprobs: [B, L]. Returns: [B, L].
    """
    log_ratio = ref_logprobs - logprobs  # [B, L]
    return log_ratio.exp() - log_ratio - 1.0


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token, with asymmetric clipping ("clip-higher", DAPO §3.1).

    loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A),  r = exp(logprobs - old_logprobs).
    Args:
        logprobs, old_logprobs: [B, L] log-probabilities of the sampled tokens now / at rollout time.
        advantages: [B, L] (an episode's advantage broadcast over its tokens).
    Returns:
        ([B, L] per-token loss, [B, L] 1.0 where the clipped branch was taken).
    """
    ratio = (logprobs - old_logprobs).exp()  # [B, L]
    unclipped = ratio * advantages  # [B, L]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages  # [B, L]
    loss = -torch.minimum(unclipped, clipped)  # [B, L]
    return loss, (clipped < unclipped).to(loss.dtype)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, response_mask: torch.Tensor, *, clip_low: float, clip_high: float,
              kl_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (DeepSeekMath eq. 3): clipped surrogate + kl_coef * KL to the reference, averaged
    over generated tokens only.

    Args:
        logprobs, old_logprobs, ref_logprobs: [B, L]; ref_logprobs may be None when kl_coef == 0.
        advantages: [B] one per episode. response_mask: [B, L], 1 on tokens the model generated.
    Returns:
        (scalar loss, detached stats for logging).
    """
    adv = advantages[:, None].expand_as(logprobs)  # [B, L]
    pg, clipped = clipped_policy_loss(logprobs, old_logprobs, adv, clip_low, clip_high)  # [B, L]
    per_token = pg
    kl = torch.zeros_like(pg)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if kl_coef > 0:
        kl = kl_k3(logprobs, ref_logprobs)  # [B, L]
        per_token = pg + kl_coef * kl
    loss = masked_mean(per_token, response_mask)
    stats = {
        "loss/policy": masked_mean(pg, response_mask).detach(),
        "loss/kl": masked_mean(kl, response_mask).detach(),
        "loss/clip_fraction": masked_mean(clipped, response_mask).detach(),
        "loss/total": loss.detach(),
    }
    return loss, stats


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token under `logits / temperature` (the sampling distribution).

    Args: logits: [B, L+1, V] from the model on input_ids: [B, L+1]. Returns: [B, L].
    """
    logits = logits[:, :-1].float() / temperature  # [B, L, V]
    targets = input_ids[:, 1:]  # [B, L]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # [B, L]
