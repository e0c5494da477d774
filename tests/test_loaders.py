"""The recipes' input pipelines: per-sample seeding, the training RNG stream, and the loaders' augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from share_transform.train import DistInfo, make_loader
from share_transform.train.data.cifar import CifarDataset
from share_transform.train.data.sampling import _splitmix64, sample_seed, sample_seeds

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _GlobalNoise(Dataset):
    """Draws from torch's global generator: the path for datasets that take no generator."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3), i


class _GeneratorNoise(_GlobalNoise):
    """Draws from the generator the loader passes."""

    def augmented_sample(self, i: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        return torch.rand(3, generator=generator), i


def test_sample_seeds_are_splitmix64_of_seed_epoch_index() -> None:
    # SplitMix64's published first output for state 0.
    assert int(_splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
    seeds = sample_seeds(3, 2, np.arange(1000))
    assert seeds.dtype == torch.int64 and int(seeds.min()) >= 0 and len(set(seeds.tolist())) == 1000
    assert seeds[:3].tolist() == [sample_seed(3, 2, i) for i in range(3)]
    assert sample_seed(3, 2, 0) != sample_seed(3, 1, 0) != sample_seed(2, 2, 0)
    assert sample_seed(0, 0, -1) != sample_seed(0, 0, -2)  # negative indices: the trainer's per-rank streams


@pytest.mark.parametrize(
    "dataset",
    [
        _GlobalNoise(),
        _GeneratorNoise(),
        CifarDataset(torch.rand(8, 3, 8, 8), torch.arange(8), crop=True, flip=True),
    ],
    ids=["global-generator", "own-generator", "batched"],
)
def test_loading_in_process_leaves_the_training_rng_stream_unchanged(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(7)
    expected = torch.rand(5)

    torch.manual_seed(7)
    loader = make_loader(dataset, batch_size=4, train=True, seed=1, dist_info=CPU, workers=0)
    reseeded: list[int] = []
    with monkeypatch.context() as m:
        # torch.manual_seed would reseed every CUDA generator through these (fork_rng(devices=[]) keeps them).
        m.setattr(torch.cuda, "manual_seed_all", reseeded.append)
        m.setattr(torch.cuda, "manual_seed", reseeded.append)
        batches = [b[0] for b in loader]
    assert torch.equal(torch.rand(5), expected)
    assert reseeded == []
    # ...and the augmentation is the seed's, not the stream's: an epoch replays exactly.
    torch.manual_seed(123)
    assert all(torch.equal(a, b[0]) for a, b in zip(batches, loader, strict=True))


def test_batched_and_per_sample_paths_give_the_same_epoch_with_and_without_workers() -> None:
    dataset = CifarDataset(torch.rand(16, 3, 6, 6), torch.arange(16), crop=True, flip=True)

    def epoch(workers: int, epoch: int) -> torch.Tensor:
        loader = make_loader(dataset, batch_size=4, train=True, seed=5, dist_info=CPU, workers=workers)
        loader.sampler.set_epoch(epoch)
        return torch.cat([torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader])

    in_process = epoch(0, 1)
    assert torch.equal(in_process, epoch(2, 1))
    assert not torch.equal(in_process, epoch(0, 2))
    # A sample indexed alone (SeededDataset.__getitem__) is the one its batch held.
    seeded = make_loader(dataset, batch_size=4, train=True, seed=5, dist_info=CPU, workers=0).dataset
    x, y = seeded[(1, int(in_process[0, -1]))]
    assert torch.equal(x.flatten(), in_process[0, :-1]) and int(y) == int(in_process[0, -1])
