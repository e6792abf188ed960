"""Data-parallel `trainer run` (DDP through accelerate/torchrun) over one at-least-once queue.

Exactly-once needs one owner of the queue-side state, so every queue or run-directory write
happens on rank 0 and the other ranks only train:

- start: rank 0 takes the run-dir lock, reads the ledger (acks the last commit's pairs, releases
  the rest), finds the committed checkpoint to resume from (deleting uncommitted ones) and
  broadcasts it; every rank resumes the Trainer from that one path, so all agree on the step.
- data: rank 0 alone leases, in global micro-batches of batch_size x world_size pairs, drops
  stale / untrainable pairs, and broadcasts each global micro-batch (tokenised examples with
  their ids) with `torch.distributed.broadcast_object_list`; rank r trains slice r. Every rank
  therefore runs the same number of micro-batches and optimizer steps (DDP's all-reduce keeps
  the weights equal), and an end of data (stop, idle, budget) is broadcast too (None), so all
  ranks leave the epoch together. A partial global batch at the end is not trained: its leases
  go back to the queue with the consumer's release.
- steps: rank 0's examples carry the ids of the other ranks' examples of the same micro-batch,
  so rank 0's ledger records every pair of each optimizer step.
- control: stop / idle / has-uncommitted decisions are rank 0's, broadcast at each step end, so
  all ranks save and stop at the same step.
- commit: all ranks write their part of `checkpoint-N` (adapter and optimizer on rank 0, one RNG
  file per rank); after a barrier rank 0 writes the commit marker, acks, rotates and publishes.

With one process (`world_size == 1`) every collective is the identity: the same code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """Ranks from the launcher's environment (accelerate launch / torchrun set WORLD_SIZE, RANK);
        joins the process group (gloo on CPU, nccl on GPU) through accelerate, which the Trainer
        then reuses."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        # cpu=True without a GPU: accelerate then picks MULTI_CPU + gloo (else it stays single-process)
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes)

    def trainer_args(self) -> dict[str, Any]:
        """TrainingArguments for this layout: without a GPU, transformers only sets accelerate up for
        several CPU processes (gloo) when told `use_cpu`; DDP with LoRA has no unused parameters."""
        if self.world == 1:
            return {}
        import torch

        return {"use_cpu": not torch.cuda.is_available(), "ddp_find_unused_parameters": False}

    def bcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (the others' argument is ignored)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box: list[Any] = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def close(dist: Dist) -> None:
    """Leave the process group (a gloo group left to the interpreter's exit can abort)."""
    if dist.world > 1:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
