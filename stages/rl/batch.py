"""Episodes as tensors: the step's batch, its length-bucketed micro-batches, and the problem order.

The group_size episodes of a problem all start with the same prompt. With `shared_prefix`, a batch
holds each distinct prompt once (minus its last token: the prefix) and every episode as its suffix
(the prompt's last token, then everything after it); the forward passes run each prefix once and let
its episodes attend to its keys/values (Prefix Grouper, Liu et al. 2025, arXiv 2506.05433). Without
it the prefix is empty and the suffix is the whole episode.

A batch is right-padded once to its longest suffix; a micro-batch takes some rows and trims the
columns to its own longest row. Sorting episodes by length before cutting micro-batches keeps the
padding (wasted forward/backward slots) small: at T = 5 episodes run from one turn to five, and one
tensor padded to the longest wastes about half of its slots.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import numpy as np
import torch

from stages.common.contracts import Problem
from stages.common.episodes import Episode

# Row-wise tensors of a batch, and the ones that are [B, W] (the others per position are [B, W-1]).
_TOKEN_FIELDS = ("input_ids", "attention_mask")
_SHARED_FIELDS = ("prefix_ids", "prefix_mask")


@dataclass
class Batch:
    """Episodes as right-padded tensors: B rows, W = longest suffix, U distinct prefixes of width P.

    input_ids: [B, W] each episode's suffix, token ids exactly as played; attention_mask: [B, W];
    response_mask: [B, L] (L = W-1) 1 where token j+1 was sampled by the policy (aligned with log-probs);
    rollout_logprobs: [B, L] the rollout engine's log-prob of each sampled token (0 elsewhere);
    lengths: [B] suffix tokens per episode; group: [B] which prefix the episode continues;
    prefix_ids, prefix_mask: [U, P] (P = 0 without shared prefixes); prefix_lens: [B] its length.
    Filled in before the update (None until then): advantages [B] (GRPO) or [B, L] (PPO); returns [B, L]
    the critic's targets; old_logprobs, ref_logprobs, old_values [B, L] at rollout time.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    lengths: torch.Tensor
    group: torch.Tensor
    prefix_lens: torch.Tensor
    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def has_prefix(self) -> bool:
        return self.prefix_ids.shape[1] > 0

    def rows(self, idx: torch.Tensor, device: torch.device | None = None) -> Batch:
        """The rows `idx`, trimmed to their own longest suffix (and moved to `device`); the prefixes
        are shared by every micro-batch and come whole."""
        width = int(self.lengths[idx].max())
        return Batch(*(_take(getattr(self, f.name), idx, width, f.name, device) for f in fields(self)))


def _take(t: torch.Tensor | None, idx: torch.Tensor, width: int, name: str, device) -> torch.Tensor | None:
    if t is None:
        return None
    if name not in _SHARED_FIELDS:
        t = t[idx]
        if t.dim() == 2:  # token tensors: [B, W] or the [B, W-1] position tensors
            t = t[:, : width if name in _TOKEN_FIELDS else width - 1]
    return t.to(device) if device is not None else t


def collate(episodes: list[Episode], pad_id: int, shared_prefix: bool = False) -> Batch:
    """Pack episodes exactly as they were played: same ids, mask on the generated ones. Stays on CPU;
    micro-batches move to the device one at a time.

    shared_prefix: split each episode after its prompt's second-to-last token; episodes whose prompts
    are equal share one prefix row. (The prompt's last token stays in the suffix: it predicts the first
    answer token, so every trained position is a suffix position.)
    """
    prefixes: dict[tuple[int, ...], int] = {}
    group, cut = [], []
    for e in episodes:
        prompt = tuple(e.turns[0].context_ids[:-1]) if shared_prefix else ()
        group.append(prefixes.setdefault(prompt, len(prefixes)))
        cut.append(len(prompt))
    seqs = [e.token_ids()[c:] for e, c in zip(episodes, cut, strict=True)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, W]
    attn = torch.zeros_like(ids)  # [B, W]
    resp = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, W] (shifted below)
    lps = torch.zeros((len(seqs), width), dtype=torch.float32)  # [B, W]
    for i, (e, s, c) in enumerate(zip(episodes, seqs, cut, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, : len(s)] = torch.tensor(e.response_mask()[c:])
        recorded = [lp for t in e.turns for lp in (*[0.0] * len(t.context_ids), *_logprobs(t))][c:]
        lps[i, : len(recorded)] = torch.tensor(recorded)
    prefix_width = max(map(len, prefixes))
    prefix_ids = torch.full((len(prefixes), prefix_width), pad_id, dtype=torch.long)  # [U, P]
    prefix_mask = torch.zeros_like(prefix_ids)  # [U, P]
    for prompt, u in prefixes.items():
        prefix_ids[u, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        prefix_mask[u, : len(prompt)] = 1
    return Batch(ids, attn, resp[:, 1:], lps[:, 1:], attn.sum(dim=1), torch.tensor(group), torch.tensor(cut),
                 prefix_ids, prefix_mask)


def _logprobs(turn) -> list[float]:
    return turn.logprobs if len(turn.logprobs) == len(turn.answer_ids) else [0.0] * len(turn.answer_ids)


def micro_batches(lengths: torch.Tensor, idx: torch.Tensor, token_budget: int,
                  call_cost: int = 0) -> list[torch.Tensor]:
    """Split the rows `idx` into micro-batches of similar length, each padded to its own longest row.

    Rows are sorted by length and cut into contiguous runs that minimise
        sum over micro-batches of (rows x longest row)  +  call_cost x number of micro-batches
    subject to rows x longest row <= token_budget (a row longer than the budget goes alone). A dynamic
    programme over the sorted lengths (O(N^2), N ~ hundreds); `call_cost` is what one more forward/
    backward call costs, in token slots: 0 cuts wherever a length changes, a large one packs the budget.

    Args: lengths: [B] tokens per episode; idx: [N] rows to split. Returns: index tensors covering idx.
    """
    order = idx[torch.sort(lengths[idx], stable=True).indices]  # [N] shortest first
    lens = lengths[order].numpy()
    n = len(lens)
    best = np.full(n + 1, np.inf)  # best[i]: cheapest split of the first i rows
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        width = int(lens[i - 1])  # the longest of rows j..i-1 (sorted)
        j = np.arange(max(0, i - max(1, token_budget // width)), i)  # first rows allowed by the budget
        costs = best[j] + (i - j) * width + call_cost
        k = int(np.argmin(costs))  # first minimum: the larger micro-batch on ties
        best[i], cut[i] = costs[k], j[k]
    chunks: list[torch.Tensor] = []
    i = n
    while i > 0:
        chunks.append(order[int(cut[i]):i])
        i = int(cut[i])
    return chunks[::-1]


def forward_slots(batch: Batch, chunks: list[torch.Tensor]) -> tuple[int, int]:
    """(token slots, real tokens) of one forward pass over `batch` cut into `chunks`: each micro-batch
    padded to its longest suffix, plus the distinct prefixes (each run once, padded to the longest)."""
    slots = sum(len(c) * int(batch.lengths[c].max()) for c in chunks) + batch.prefix_mask.numel()
    real = int(batch.lengths.sum()) + int(batch.prefix_mask.sum())
    return slots, real


def padding_share(lengths: torch.Tensor, chunks: list[torch.Tensor]) -> float:
    """Share of the token slots of `chunks` (each padded to its longest row) that are padding."""
    slots = sum(len(c) * int(lengths[c].max()) for c in chunks)
    real = sum(int(lengths[c].sum()) for c in chunks)
    return 1.0 - real / slots


def step_problems(problems: list[Problem], seed: int, step: int, per_step: int) -> list[Problem]:
    """The problems of 1-based step `step`: a fresh permutation of the training set per epoch (seeded by
    `seed` and the epoch), consumed `per_step` at a time. A pure function of (seed, step): the data
    position of a resumed run is exactly the step it resumes at."""
    n = len(problems)
    out: list[Problem] = []
    for pos in range((step - 1) * per_step, step * per_step):
        epoch, offset = divmod(pos, n)
        out.append(problems[_permutation(n, seed, epoch)[offset]])
    return out


_PERMS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMS:
        perm = list(range(n))
        random.Random(f"{seed}/{epoch}").shuffle(perm)
        _PERMS.clear()  # one epoch at a time is enough
        _PERMS[key] = perm
    return _PERMS[key]
