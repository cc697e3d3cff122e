"""What data-parallel ranks (engine.kind=deepspeed; launched by stages/common/rank.py) share, so that N
ranks compute what one process computes, up to the order of float sums. With one process (`Ranks()`)
every collective is the identity, so a training loop is written once for both.

- Decisions are rank 0's (`from_main`): a value every rank must agree on (SFT's sampled validation
  accuracy, which decides when to stop) or an object only rank 0 makes (RL's episodes, `share_rollout`).
- Sums are exact where each row or value comes from one rank (`sum`, `sum_values`): the logged loss of a
  step, RL's [B, L] scores of micro-batches scored on different ranks.
- Equal call counts: ZeRO-2/3 reduce gradients over the ranks in every backward, and ZeRO-3 gathers
  weights in every forward, so a rank with fewer micro-batches runs one again with weight 0 (`deal`).

How RL shares one step:
- Rollout: rank 0 plays the step's episodes and broadcasts them, together with its torch RNG state
  after the rollout. Every rank then holds the same batch and the same RNG state as the one-process run
  at that point (the state matters: a minibatch order or a dropout mask drawn later must agree). Under
  ZeRO-3 every rank must take part in each generate forward (the weights are gathered there), so with
  the `hf` engine every rank generates, in lockstep, and rank 0's copy still wins.
  Why not each rank sampling its share of the problems: a sampled token depends on what its row was
  batched with (left padding and batch shape change the float rounding of the logits), so a run with
  another number of ranks could never reproduce the one-process samples, and the comparison of the two
  would measure sampling noise instead of the engine. The cost: the rollout does not get faster with
  more ranks (the forwards, backwards and optimizer state do).
- Forward and backward passes: the step's micro-batches are cut from the whole batch exactly as in one
  process (`batch.micro_batches`) and dealt round-robin. Each rank scores its own micro-batches; the
  [B, L] scores are summed over ranks (each row comes from one rank, zeros from the others: exact), so
  advantages are computed on the full batch, the same on every rank.
- Losses: a micro-batch's loss is weighted by its share of the minibatch's generated tokens over ALL
  ranks, so the ranks' gradients add up to the one-process gradient; DeepSpeed reduces them (the engine
  undoes its averaging).

SFT draws the same global batch on every rank from the same seed and trains each rank on its share of
the examples (stages/sft/stage.py).

On several nodes the ranks share no disk: files each rank writes where it runs (DeepSpeed's optimizer
partitions in a checkpoint) are moved to rank 0 before it logs them (`move_files_to_main`).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.processes import NODE_RANK_ENV


@dataclass
class Ranks:
    """This process's place among the ranks (the defaults: one process, nothing to share)."""

    rank: int = 0
    world_size: int = 1
    lockstep_forwards: bool = False
    """ZeRO-3 over several ranks: every rank must run the same forward calls of the trained models."""
    node: int = 0
    """The node (machine) this rank runs on; ranks on different nodes see different disks."""

    @classmethod
    def of(cls, engine) -> Ranks:
        return cls(engine.rank, engine.world_size, bool(engine.lockstep_forwards),
                   int(os.environ.get(NODE_RANK_ENV) or 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def deal(self, chunks: list[torch.Tensor], pad: bool) -> list[tuple[torch.Tensor, float]]:
        """This rank's micro-batches (round-robin) as (rows, 1.0); with `pad`, topped up to the same count
        on every rank with (rows, 0.0) entries to run for the collectives' sake and then ignore."""
        mine = [(c, 1.0) for c in chunks[self.rank::self.world_size]]
        if pad and self.world_size > 1:
            spare = mine[-1][0] if mine else chunks[0]
            mine += [(spare, 0.0)] * (math.ceil(len(chunks) / self.world_size) - len(mine))
        return mine

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over all ranks (a CPU tensor; moved to this rank's GPU and back under nccl)."""
        if self.world_size == 1:
            return t
        on = t.to(_collective_device())
        torch.distributed.all_reduce(on)
        return on.to(t.device)

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over all ranks (every rank passes the same keys)."""
        if self.world_size == 1:
            return values
        keys = sorted(values)
        total = self.sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, total.tolist(), strict=True))

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; the other ranks' `obj` is ignored)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def share_rollout(self, episodes: list | None) -> list:
        """Rank 0's episodes and its RNG state after the rollout, on every rank (see the module doc)."""
        if self.world_size == 1:
            return episodes
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        episodes, cpu, cuda = self.from_main((episodes, torch.get_rng_state(), cuda))
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        return episodes

    def move_files_to_main(self, folder: Path) -> None:
        """Copy the files under `folder` on every other node into rank 0's `folder` (the same path relative
        to each rank's own out_dir), then remove them there. A collective; on one node nothing moves.

        The first rank of each node sends its node's files, pickled through the process group: costs their
        size in memory on rank 0, and once over the network.
        """
        if self.world_size == 1:
            return
        nodes: list[int | None] = [None] * self.world_size
        torch.distributed.all_gather_object(nodes, self.node)
        sends = self.node != nodes[0] and nodes.index(self.node) == self.rank
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()} if sends else {}
        gathered: list[dict[str, bytes] | None] | None = [None] * self.world_size if self.main else None
        torch.distributed.gather_object(files, gathered, dst=0)
        if sends:
            shutil.rmtree(folder, ignore_errors=True)
        for part in gathered or []:
            for rel, data in (part or {}).items():
                path = folder / rel
                if not path.exists():  # rank 0's own copy of a file every node wrote wins
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
