"""Aspect-ratio grouped batches for detection training (mmdet's GroupSampler and
DistributedGroupSampler idea): landscape images (w > h, mmdet's flag 1) and the
others (portrait and square) never share a batch, so padding a batch to its
largest image wastes little.

Per epoch, from (seed, epoch) alone: each group is shuffled and cut into batches
of ``batch_size`` (the last one of a group may be smaller), the batches are
shuffled, and under DDP the list is made a multiple of the number of ranks by
splitting the largest batches (so every image still comes exactly once); only
when there are fewer images than batches needed are batches repeated. Rank r
takes batches r, r + R, r + 2R, ...: every rank runs the same number of steps.
"""
from __future__ import annotations

import math

import torch


def aspect_groups(sizes) -> list[int]:
    """1 for landscape (w > h), 0 otherwise; ``sizes`` holds (h, w) pairs."""
    return [1 if w > h else 0 for h, w in sizes]


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for ``DataLoader(batch_sampler=...)``.

    ``sizes``: (h, w) per dataset index (``CocoDetection.sizes``). ``num_replicas``
    and ``rank`` default to the initialised process group (1 and 0 without one).
    ``drop_last`` drops each group's incomplete batch; ``shuffle=False`` keeps
    index order within groups and the batch order (landscape batches last)."""

    def __init__(self, sizes, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int | None = None,
                 rank: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas or (dist.get_world_size() if initialised else 1)
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.groups = aspect_groups(sizes)
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = []
        for flag in (0, 1):
            idx = [i for i, f in enumerate(self.groups) if f == flag]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        r = self.num_replicas
        if not batches or len(batches) % r == 0:
            return batches
        # split the largest batches in two until the count is a multiple of r
        while len(batches) % r and max(len(b) for b in batches) > 1:
            j = max(range(len(batches)), key=lambda k: len(batches[k]))
            b = batches[j]
            batches[j:j + 1] = [b[:(len(b) + 1) // 2], b[(len(b) + 1) // 2:]]
        k = 0
        while len(batches) % r:  # fewer images than batches needed: repeat some
            batches.append(list(batches[k]))
            k += 1
        return batches

    def __iter__(self):
        return iter(self._all_batches()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        n = 0
        for flag in (0, 1):
            k = sum(1 for f in self.groups if f == flag)
            n += k // self.batch_size if self.drop_last else math.ceil(k / self.batch_size)
        if n == 0:
            return 0
        return math.ceil(n / self.num_replicas)
