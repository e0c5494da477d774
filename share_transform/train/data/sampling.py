"""Data loading shared by the recipes: sharded, reproducible, resumable at any epoch.

Each sample's random augmentation is drawn from a generator seeded by ``(seed, epoch, index)``, not by
the worker that happens to load it, so a run's data stream depends only on the seed: not on
``--workers``, not on persistent workers, not on the world size, and a run resumed at epoch ``e``
sees exactly the batches an uninterrupted run would have. The training order is a
``DistributedSampler`` permutation of ``(seed, epoch)``, one shard per rank.

Example:
    >>> train_loader = make_loader(train_set, batch_size=64, train=True, seed=0, dist_info=info, workers=8)
    >>> for epoch in range(epochs):
    ...     set_epoch(train_loader, epoch)
    ...     for images, targets in train_loader: ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..distributed import DistInfo

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of Steele et al.'s SplitMix64: a bijective, well-mixing map of 64-bit integers."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-spread 63-bit seed for one sample of one epoch (distinct pairs give unrelated streams)."""
    h = _splitmix64(seed & _M64)
    h = _splitmix64(h ^ (epoch & _M64))
    return _splitmix64(h ^ (index & _M64)) >> 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Wrap an index sampler so it yields ``(epoch, index)``: the epoch reaches the workers with each index.

    (Setting an attribute on the dataset would not reach persistent workers, which hold a copy.)
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class SeededDataset(Dataset):
    """Index with ``(epoch, index)``: loads ``dataset[index]`` under a CPU generator seeded for that pair.

    ``torch.random.fork_rng`` restores the caller's generator afterwards, so loading in the main process
    (``workers=0``) leaves the training RNG stream untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding: every sample evaluated exactly once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    dist_info: DistInfo,
    workers: int,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over this rank's shard of ``dataset``.

    Args:
        dataset: returns ``(image, target)``; its random transforms draw from torch's CPU generator.
        batch_size: per rank (the recipe divides the global batch by the world size).
        train: shuffle per epoch and drop the last partial batch (training), or keep the order and every
            sample (evaluation: each rank takes every ``world_size``-th sample, no padding duplicates).
        seed: the run's seed; the order and the augmentation of epoch ``e`` depend on ``(seed, e)`` only.
        dist_info: from :func:`init_distributed`.
        workers: loader processes per rank (0 loads in the training process).
        pin_memory: default on when training on CUDA, for non-blocking host-to-device copies.

    Call :func:`set_epoch` before each epoch.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if train:
        base: Sampler[int] = DistributedSampler(
            dataset,
            num_replicas=dist_info.world_size,
            rank=dist_info.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
    else:
        base = ShardSampler(n, dist_info.rank, dist_info.world_size)
    if pin_memory is None:
        pin_memory = dist_info.device.type == "cuda"
    return DataLoader(
        SeededDataset(dataset, seed),
        batch_size=batch_size,
        sampler=EpochSampler(base),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select ``epoch``'s order and augmentation in a loader from :func:`make_loader`."""
    if not isinstance(loader.sampler, EpochSampler):
        raise TypeError("the engine needs loaders made by share_transform.train.make_loader")
    loader.sampler.set_epoch(epoch)


class SyntheticDataset(Dataset):
    """``length`` random uint8 images ``3 x size x size`` with random labels, a pure function of the index.

    For ``--synthetic`` runs: the full input pipeline without disk or decoding.
    """

    def __init__(self, length: int, size: int, num_classes: int, seed: int = 0) -> None:
        self.length, self.size, self.num_classes, self.seed = length, size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, -1, index))
        image = torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=g)
        return image, int(torch.randint(0, self.num_classes, (), generator=g))
