"""The training order: a function of (seed, epoch) and of the global batch, with a position that a checkpoint keeps,
so that a resumed run sees exactly the batches the uninterrupted run saw, and W ranks at batch b see the batches one
rank sees at batch W * b.

:class:`ResumableSampler` orders epoch e as a seeded shuffling DataLoader does in one process
(:func:`single_process_order`, so that results from before the position was checkpointed reproduce); under DDP the
same order is cut into global batches of ``world_size * batch_size`` blocks and rank r takes the r-th of W contiguous
slices of each (:func:`rank_share`): the ranks of a step together hold exactly the blocks one rank would hold at the
global batch size, whatever W, and token-exact accumulation (:class:`~lightning_distill.modules.base.TokenWindow`)
makes the step's gradient the same. It is a ``DistributedSampler``, which Lightning leaves as it is under DDP and
calls ``set_epoch`` on at every epoch start; it starts ``start`` indices into its epoch.

The position is read from the trainer when a checkpoint is written (:func:`train_position`): the epoch and the
batches of it whose training step finished, as Lightning's fit loop counts them when it restores its own progress.
Lightning restores the data module's state before it asks for the train loader, so the loader of a resumed run
starts where the interrupted one stopped: mid-epoch, or at the start of the next epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_distill import checks


class ResumableSampler(DistributedSampler):
    """A seeded shuffle per epoch, this rank's share of each global batch of it, from ``start`` on in epoch
    ``epoch``.

    Args:
        dataset: the dataset to draw indices of (only its length is used).
        num_replicas: number of ranks (the trainer's world size).
        rank: this rank.
        seed: seeds every epoch's order.
        epoch: the epoch the first iteration serves (later ones follow ``set_epoch``).
        start: indices of this rank's share of ``epoch`` to skip (those a checkpointed run already trained on).
        batch_size: blocks per batch on each rank: a global batch is ``num_replicas * batch_size`` blocks.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0,
                 start: int = 0, batch_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        checks.require(start >= 0, "start", start, ">= 0")
        checks.integer("batch_size", batch_size, ">= 1", lambda v: v >= 1, "8")
        self.epoch, self.start, self.batch_size = epoch, start, batch_size

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` next; a new epoch starts from its first index."""
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        # one process: the order a shuffling DataLoader seeded with `seed` has always had; W: this rank's slices of it
        indices = single_process_order(len(self.dataset), self.seed, self.epoch)
        if self.num_replicas > 1:
            indices = rank_share(indices, self.num_replicas, self.rank, self.batch_size)
        return iter(indices[self.start :])

    def __len__(self) -> int:
        """This rank's share of the whole epoch (Lightning counts a resumed epoch's batches from where it
        stopped)."""
        if self.num_replicas == 1:
            return len(self.dataset)
        return len(rank_share(list(range(len(self.dataset))), self.num_replicas, self.rank, self.batch_size))


def rank_share(order: list[int], ranks: int, rank: int, batch_size: int) -> list[int]:
    """Rank ``rank``'s indices of an epoch's ``order``: of each global batch of ``ranks * batch_size`` blocks, the
    ``rank``-th of ``ranks`` contiguous slices as equal as possible (the first ones a block longer), so that every
    rank's loader cuts them into the same batches. The last global batch of an epoch may be short; a rank left
    without a block of it (fewer blocks than ranks) repeats its first block, as ``DistributedSampler`` pads: the one
    case where the ranks' blocks differ from one rank's.

    Args:
        order: the epoch's order of block indices.
        ranks: number of ranks, W.
        rank: this rank, in [0, W).
        batch_size: blocks per batch on each rank, b.
    """
    share, size = [], ranks * batch_size
    for begin in range(0, len(order), size):
        batch = order[begin : begin + size]
        base, extra = divmod(len(batch), ranks)
        first = rank * base + min(rank, extra)
        part = batch[first : first + base + (rank < extra)]
        share += part or batch[:1]
    return share


def single_process_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch ``epoch`` of ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    iterated through once per epoch (how this data module served one process before its position was checkpointed,
    so that earlier results reproduce): each epoch's iterator takes one int64 from the generator (its workers' base
    seed), then its ``RandomSampler`` draws the epoch's ``randperm(n)``, and one more (discarded) once exhausted."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        torch.randperm(n, generator=generator), torch.randperm(n, generator=generator)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator).tolist()


class ResumableLoader(DataLoader):
    """The train loader. Lightning asks a loader whether it resumes mid-epoch (``state_dict`` /
    ``load_state_dict``, else it warns); this one does, through its :class:`ResumableSampler`, whose position the
    data module keeps in the checkpoint: the loader itself has no state of its own."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here (see :meth:`DistillDataModule.load_state_dict`)."""


def train_position(trainer: L.Trainer) -> dict[str, int]:
    """``{"epoch", "batches"}``: where a run resumed from a checkpoint written now goes on, as Lightning's fit loop
    restores its progress: the batches of the epoch whose step finished (a checkpoint written in
    ``on_train_batch_end`` counts that batch; one written on an error mid-step does not), and past the last batch
    of an epoch, the start of the next."""
    loop = trainer.fit_loop
    batches = loop.epoch_loop.batch_progress.current
    done = batches.completed
    if batches.ready == batches.started == batches.processed == batches.completed + 1:  # in on_train_batch_end
        done = batches.processed
    # epoch_progress.started counts epochs that began (it is incremented after on_train_epoch_start)
    epoch = max(loop.epoch_progress.current.started - 1, 0)
    if 0 < trainer.num_training_batches <= done:  # the epoch is over: the next one starts from its first batch
        return {"epoch": epoch + 1, "batches": 0}
    return {"epoch": epoch, "batches": done}


def check_position(state: Any) -> dict[str, int]:
    """A saved position, checked (``{"epoch": int >= 0, "batches": int >= 0}``)."""
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and state[k] >= 0
                                              for k in ("epoch", "batches")):
        raise ValueError(f"the checkpoint's data position must be {{'epoch': int, 'batches': int}}, got {state!r}")
    return {"epoch": state["epoch"], "batches": state["batches"]}
