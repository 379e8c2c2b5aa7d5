"""An epoch-seeded sampler: the same order for the same (seed, epoch) on any machine, resumable mid-epoch.

It yields *keys* k = epoch * n + index rather than bare indices, so that a
dataset can seed each item's randomness (slice, crop, flip) from (seed, k)
alone: worker count, restarts and resumes then never change what a step sees.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Keys of one epoch of n items, shuffled.

    group > 1: the n items are `group` draws of each of n / group subjects (item i belongs to
    subject i % (n / group)); the subjects are shuffled and each one's draws come one after
    another, as when a subject is loaded once and several slices are drawn from it (the
    reference's `rep_step`). Each rank then takes a contiguous run of the order.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 group: int = 1):
        if n < batch_size * world_size:
            raise ValueError(f"{n} training items cannot fill one batch of {batch_size} on {world_size} process(es)")
        if n % group:
            raise ValueError(f"{n} items are not {group} draws per subject")
        self.n, self.batch_size, self.seed, self.group = n, batch_size, seed, group
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration yields `epoch`'s items, skipping its first `start` batches (resume)."""
        self.epoch, self.start = epoch, start

    def _keys(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        per_rank = self.batches_per_epoch * self.batch_size
        if self.group > 1:
            subjects = self.n // self.group
            order = (torch.randperm(subjects, generator=gen)[:, None]
                     + subjects * torch.arange(self.group)).flatten()  # a subject's draws in a row
            mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        else:
            order = torch.randperm(self.n, generator=gen)[: per_rank * self.world_size]
            mine = order[self.rank::self.world_size]  # each rank a disjoint share, same count
        return (mine[self.start * self.batch_size:] + self.epoch * self.n).tolist()

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch_size
