"""SFT batches: token lists into the tensors one forward takes, and each forward's share of the step loss.

Pure tensor code without MLflow or the stage's I/O, so that benchmarks (benchmarks/gpu.py) and other
stages' code reuse exactly what SFT trains on.
"""

from __future__ import annotations

import math

import torch

from stages.common.config import ConfigError
from stages.common.model import selected_logits
from stages.sft.config import Config

#: (token ids, loss mask, number of earlier wrong attempts) of one SFT conversation.
Example = tuple[list[int], list[int], int]


def num_targets(examples: list[Example]) -> int:
    """Tokens that carry loss (HF shifts labels by one: a first token is never a target)."""
    return sum(sum(mask[1:]) for _, mask, _ in examples)


def pad_batch(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels [B, L]; labels are -100 where the mask is 0."""
    width = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros_like(input_ids)  # [B, L]
    labels = torch.full_like(input_ids, -100)  # [B, L]
    for i, (ids, mask, _) in enumerate(examples):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), -100)
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def pack_batch(examples: list[Example], pad_id: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Examples packed first-fit-decreasing into rows of `length` tokens: input_ids/position_ids/labels
    [R, length] and NO attention mask.

    Position ids restart at 0 for each example; transformers reads the restarts as sequence boundaries
    and keeps attention within each example (masking_utils.find_packed_sequence_indices), with sdpa and
    eager alike. Labels stay aligned: the first token of an example is template (mask 0), so the last
    token of the one before it predicts nothing. Tail padding is a sequence of its own with no labels.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e[0])):
        if len(ex[0]) > length:
            raise ConfigError(f"sft.pack_length: an example of {len(ex[0])} tokens does not fit rows of {length}")
        slot = next((r for r, free in enumerate(room) if free >= len(ex[0])), None)
        if slot is None:
            rows.append([])
            room.append(length)
            slot = len(rows) - 1
        rows[slot].append(ex)
        room[slot] -= len(ex[0])
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [R, length]
    positions = torch.zeros_like(input_ids)  # [R, length]
    labels = torch.full_like(input_ids, -100)  # [R, length]
    for r, row in enumerate(rows):
        at = 0
        for ids, mask, _ in row:
            n = len(ids)
            input_ids[r, at:at + n] = torch.tensor(ids)
            positions[r, at:at + n] = torch.arange(n)
            labels[r, at:at + n] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), -100)
            at += n
        positions[r, at:] = torch.arange(length - at)
    return {"input_ids": input_ids.to(device), "position_ids": positions.to(device), "labels": labels.to(device)}


def micro_batches(examples: list[Example], cfg: Config, pad_id: int, pack_length: int,
                  device: torch.device) -> list[list[dict[str, torch.Tensor]]]:
    """This rank's examples as `cfg.micro_steps` micro-batches, each a list of forward inputs.

    `bucket` gives one forward per number of earlier attempts: padded together, every example would be
    padded to the longest 4-attempt one (~4x a single-turn example), doubling a step's compute.
    """
    size = math.ceil(len(examples) / cfg.micro_steps)
    out = []
    for start in range(0, len(examples), size):
        chunk = examples[start:start + size]
        if cfg.batching == "pack":
            out.append([pack_batch(chunk, pad_id, pack_length, device)])
        elif cfg.batching == "pad":
            out.append([pad_batch(chunk, pad_id, device)])
        else:
            by_attempts: dict[int, list[Example]] = {}
            for ex in chunk:
                by_attempts.setdefault(ex[2], []).append(ex)
            out.append([pad_batch(by_attempts[k], pad_id, device) for k in sorted(by_attempts)])
    return out


def loss_share(model, forwards: list[dict[str, torch.Tensor]], global_targets: int) -> torch.Tensor:
    """Summed token cross-entropy of these forwards divided by the target count of the WHOLE step over all
    ranks and micro-batches: the shares add up to the step's mean token loss exactly.

    The head runs on the target positions only (`selected_logits`); `use_cache=False` also lets packed
    rows be recognised (no cache object in the forward).
    """
    total = 0.0
    for f in forwards:
        labels = f["labels"][:, 1:]  # [B, L-1] what each position predicts
        where = labels != -100  # [B, L-1]
        inputs = {k: v for k, v in f.items() if k != "labels"}
        logits = selected_logits(model, inputs, where).float()  # [N, V]
        total = total + torch.nn.functional.cross_entropy(logits, labels[where], reduction="sum")
    return total / global_targets
