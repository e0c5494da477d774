"""Data loading shared by the recipes: sharded, reproducible, resumable at any epoch.

Each sample's random augmentation is drawn from a generator seeded by ``(seed, epoch, index)``, not by
the worker that happens to load it, so a run's data stream depends only on the seed: not on
``--workers``, not on persistent workers, not on the world size, and a run resumed at epoch ``e``
sees exactly the batches an uninterrupted run would have. The training order is a
``DistributedSampler`` permutation of ``(seed, epoch)``, one shard per rank.

Seeding costs microseconds and never touches the training process's generators (CUDA's included). A
dataset says how it takes its randomness:

* :class:`SampleAugmented` (``augmented_sample(index, generator)``): one ``torch.Generator`` per sample,
  seeded from the hash (the ImageNet datasets);
* :class:`BatchAugmented` (``augmented_batch(indices, seeds)``): a whole batch at once from the samples'
  63-bit hashes (the CIFAR datasets: no per-sample Python work);
* any other dataset is indexed under ``fork_rng`` with only torch's CPU generator seeded.

A :class:`~share_transform.errors.DataError` raised in a loader worker (an undecodable image) reaches the
training process as the same one-line error, without the worker's traceback.

Example:
    >>> train_loader = make_loader(train_set, batch_size=64, train=True, seed=0, dist_info=info, workers=8)
    >>> for epoch in range(epochs):
    ...     set_epoch(train_loader, epoch)
    ...     for images, targets in train_loader: ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..distributed import DistInfo
from ..errors import ConfigError, DataError

_M64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """One step of Steele et al.'s SplitMix64 on uint64s: a bijective, well-mixing map (arithmetic wraps)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Well-spread 63-bit seeds (non-negative int64) of samples ``indices`` of one epoch, in one pass.

    Distinct ``(seed, epoch, index)`` give unrelated values.

    Example:
        >>> sample_seeds(0, 1, np.arange(3)).tolist() == [sample_seed(0, 1, i) for i in range(3)]
        True
    """
    h = splitmix64(np.array([seed & _M64], dtype=np.uint64))
    h = splitmix64(h ^ np.uint64(epoch & _M64))
    h = splitmix64(h ^ np.asarray(indices).astype(np.uint64))
    return torch.from_numpy((h >> np.uint64(1)).astype(np.int64))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of one sample of one epoch (a negative ``index`` names another stream of the epoch)."""
    return int(sample_seeds(seed, epoch, np.array([index & _M64], dtype=np.uint64))[0])


@runtime_checkable
class SampleAugmented(Protocol):
    """A dataset that draws a sample's augmentation from the generator it is given."""

    def augmented_sample(self, index: int, generator: torch.Generator) -> Any: ...


@runtime_checkable
class BatchAugmented(Protocol):
    """A dataset that augments a batch at once, sample ``indices[k]`` from ``seeds[k]`` (63 bits) only.

    Returns the collated batch.
    """

    def augmented_batch(self, indices: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


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
    """Index with ``(epoch, index)``: loads sample ``index`` with randomness seeded for that pair only.

    The seed reaches the dataset as a generator (:class:`SampleAugmented`), as hashes of a whole batch
    (:class:`BatchAugmented`), or else as the state of torch's CPU generator under ``fork_rng``. None of
    the three changes the caller's generators, so loading in the training process (``workers=0``) leaves
    its RNG stream untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.batched = isinstance(dataset, BatchAugmented)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if self.batched:
            return tuple(t[0] for t in self.__getitems__([key]))
        seed = sample_seed(self.seed, epoch, index)
        if isinstance(self.dataset, SampleAugmented):
            return self.dataset.augmented_sample(index, torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):
            # Not torch.manual_seed: it also reseeds every CUDA generator, which fork_rng(devices=[]) leaves.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Any:
        """A batch: collated already by a :class:`BatchAugmented` dataset, else a list of samples to collate."""
        if not self.batched:
            return [self[key] for key in keys]
        indices = torch.tensor([index for _, index in keys])
        # One pass of the sampler is one epoch: the keys of a batch share it.
        seeds = sample_seeds(self.seed, keys[0][0], indices)
        return self.dataset.augmented_batch(indices, seeds)  # type: ignore[attr-defined]


def _collated(batch: Any) -> Any:
    """The collate function of batches that a :class:`BatchAugmented` dataset collated itself."""
    return batch


def worker_message(error: BaseException) -> str:
    """The message an exception had where it was raised: a DataLoader worker's re-raise adds its traceback."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


class RecipeLoader(DataLoader):
    """A DataLoader that re-raises a worker's :class:`DataError` as the one-line error it was."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator over DataLoader's iterator
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as e:
                raise DataError(worker_message(e)) from None
            yield batch


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding: every sample evaluated exactly once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def index_sampler(length: int, *, train: bool, seed: int, dist_info: DistInfo) -> Sampler[int]:
    """This rank's indices: a ``(seed, epoch)`` permutation without the last partial share (training), or
    every ``world_size``-th index in order (evaluation)."""
    if train:
        return DistributedSampler(
            range(length),  # type: ignore[arg-type]  # only its length is read
            num_replicas=dist_info.world_size,
            rank=dist_info.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
    return ShardSampler(length, dist_info.rank, dist_info.world_size)


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
        dataset: returns ``(image, target)`` (or ``(image, augmentation, target)``); see the module's
            docstring for how it receives its randomness.
        batch_size: per rank (the recipe divides the global batch by the world size).
        train: shuffle per epoch and drop the last partial batch (training), or keep the order and every
            sample (evaluation: each rank takes every ``world_size``-th sample, no padding duplicates).
        seed: the run's seed; the order and the augmentation of epoch ``e`` depend on ``(seed, e)`` only.
        dist_info: from :func:`init_distributed`.
        workers: loader processes per rank (0 loads in the training process).
        pin_memory: default on when training on CUDA, for non-blocking host-to-device copies.

    Call :func:`set_epoch` before each epoch.
    """
    base = index_sampler(len(dataset), train=train, seed=seed, dist_info=dist_info)  # type: ignore[arg-type]
    if pin_memory is None:
        pin_memory = dist_info.device.type == "cuda"
    seeded = SeededDataset(dataset, seed)
    return RecipeLoader(
        seeded,
        batch_size=batch_size,
        collate_fn=_collated if seeded.batched else None,
        # Its own generator: otherwise every pass draws the workers' base seed from the training stream.
        generator=torch.Generator().manual_seed(seed),
        sampler=EpochSampler(base),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select ``epoch``'s order and augmentation in a loader from :func:`make_loader`."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, EpochSampler):
        raise ConfigError(
            f"set_epoch needs a loader made by share_transform.train.make_loader, got {type(loader).__name__}"
        )
    sampler.set_epoch(epoch)


#: Size of a ``--synthetic`` run's epoch, in batches: long enough to time, short enough to be a smoke test.
SYNTHETIC_TRAIN_BATCHES = 20
SYNTHETIC_VAL_BATCHES = 5


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
