"""The recipes' input pipelines: per-sample seeding, the training RNG stream, and the loaders' augmentation."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from share_transform.train import DistInfo, make_loader, set_epoch
from share_transform.train.data.cifar import CifarDataset
from share_transform.train.data.dali import DaliLoader
from share_transform.train.data.imagenet import (
    CROP_RATIO,
    CROP_SCALE,
    JITTER,
    LIGHTING_STD,
    MEAN,
    PCA_EIGVAL,
    PCA_EIGVEC,
    STD,
    Lighting,
    TrainImages,
    colour_draws,
    crop_box,
    eval_transform,
    imagenet_datasets,
    read_image,
)
from share_transform.train.data.sampling import SeededDataset, sample_seed, sample_seeds, splitmix64
from share_transform.train.errors import ConfigError
from share_transform.train.loop import ColourAugment, Normalize

TINY_MODEL = json.dumps({"channels": [8, 16, 32, 64], "stem_width": 8, "layers": [1, 1, 1, 1]})
NEEDS_DALI = pytest.mark.needs("nvidia.dali", extra="dali")

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
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
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


# -- ImageNet: the loaders agree with the PIL reference and with each other -------------------------------------------

IMG = 64


def _photo_folder(root: Path, per_class: int = 4) -> Path:
    """``root/{train,val}/{china,flower}/*.jpg``: 160x120 crops of scikit-learn's photos at quality 90."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    for split in ("train", "val"):
        for c, name in enumerate(("china", "flower")):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                crop = photos[c][40 * k : 40 * k + 120, 60 * k : 60 * k + 160]
                Image.fromarray(np.ascontiguousarray(crop)).save(root / split / name / f"{k}.jpg", quality=90)
    return root


def _ks(a: list[float], b: list[float]) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = [np.searchsorted(np.sort(x), grid, side="right") / len(x) for x in (a, b)]
    return float(np.abs(cdf[0] - cdf[1]).max())


def test_crop_windows_follow_the_pil_reference_distribution() -> None:
    # 4,000 draws each; the KS distance between two samples of one law stays under 0.045 (p < 0.001 at 0.044).
    height, width = 375, 500
    ours = [crop_box(height, width, torch.Generator().manual_seed(sample_seed(0, 0, i))) for i in range(4000)]
    torch.manual_seed(0)
    reference = [
        T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(CROP_SCALE), list(CROP_RATIO))
        for _ in range(4000)
    ]
    for boxes in (ours, reference):
        assert all(0 <= t and 0 <= left and t + h <= height and left + w <= width for t, left, h, w in boxes)
    area = [[h * w / (height * width) for _, _, h, w in boxes] for boxes in (ours, reference)]
    aspect = [[math.log(w / h) for _, _, h, w in boxes] for boxes in (ours, reference)]
    centre = [[(left + w / 2) / width for _, left, _, w in boxes] for boxes in (ours, reference)]
    assert _ks(*area) < 0.045 and _ks(*aspect) < 0.045 and _ks(*centre) < 0.045
    assert 0.08 <= min(area[0]) and max(area[0]) <= 1.0


def test_colour_draws_follow_the_pil_reference_distribution() -> None:
    draws = torch.stack([colour_draws(torch.Generator().manual_seed(sample_seed(0, 0, i))) for i in range(4000)])
    jitter = T.ColorJitter(JITTER, JITTER, JITTER)
    torch.manual_seed(0)
    reference = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, None) for _ in range(4000)]
    # Factors: uniform on [0.6, 1.4], as torchvision's ColorJitter draws them.
    for k in range(3):
        assert 0.6 <= float(draws[:, k].min()) and float(draws[:, k].max()) <= 1.4
        assert _ks(draws[:, k].tolist(), [float(r[1 + k]) for r in reference]) < 0.045
    # Order: each of the 6 orders of the three jitters about equally often (hue, index 3, is off in both).
    ours = Counter(tuple(int(v) for v in row) for row in draws[:, 3:6].tolist())
    theirs = Counter(tuple(int(v) for v in r[0].tolist() if v != 3) for r in reference)
    assert set(ours) == set(theirs) == set(itertools.permutations(range(3)))
    assert all(abs(ours[p] - theirs[p]) < 160 for p in ours)  # 667 expected each; 3 sigma of the difference is 95
    # Lighting: the offsets eigvec @ (alpha * eigval) of the PIL reference's Lighting (float path).
    offsets = (draws[:, 6:9] * torch.tensor(PCA_EIGVAL)) @ torch.tensor(PCA_EIGVEC).T
    torch.manual_seed(0)
    grey = torch.zeros(3, 1, 1)
    reference_offsets = torch.stack([Lighting(LIGHTING_STD)(grey).flatten() for _ in range(4000)])
    for c in range(3):
        assert _ks(offsets[:, c].tolist(), reference_offsets[:, c].tolist()) < 0.045


def test_device_colour_augment_is_torchvisions_jitter_then_lighting_then_normalise() -> None:
    from torchvision.transforms import functional as TF

    augment = ColourAugment(Normalize(MEAN, STD, scale=1.0), eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC)
    images = torch.randint(0, 256, (3, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draws = torch.tensor(
        [
            [0.7, 1.3, 0.9, 2, 0, 1, 0.1, -0.05, 0.02],
            [1.2, 0.8, 1.4, 0, 1, 2, 0.0, 0.0, 0.0],
            [1.0, 0.6, 1.1, 1, 2, 0, 0.3, 0.1, -0.2],
        ]
    )
    out = augment(images, draws)
    jitters = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k in range(3):
        x = images[k].float() / 255
        for op in draws[k, 3:6].long().tolist():
            x = jitters[op](x, float(draws[k, op]))
        x = x + (torch.tensor(PCA_EIGVEC) @ (draws[k, 6:9] * torch.tensor(PCA_EIGVAL))).view(3, 1, 1)
        torch.testing.assert_close(out[k], TF.normalize(x, MEAN, STD), atol=1e-6, rtol=0)


def test_torch_training_sample_is_decode_jpeg_crop_flip_with_its_draws(tmp_path: Path) -> None:
    from torchvision.transforms.v2 import functional as F

    root = _photo_folder(tmp_path)
    train = TrainImages(root / "train", IMG)
    path, target = train.samples[3]
    image, draws, label = SeededDataset(train, seed=2)[(1, 3)]
    g = torch.Generator().manual_seed(sample_seed(2, 1, 3))
    decoded = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    top, left, h, w = crop_box(120, 160, g)
    expected = F.resized_crop(read_image(path), top, left, h, w, [IMG, IMG], antialias=True)
    if torch.rand((), generator=g) < 0.5:
        expected = expected.flip(-1)
    assert torch.equal(image, expected) and torch.equal(draws, colour_draws(g)) and label == target
    assert (read_image(path).float() - decoded.float()).abs().mean() < 2  # decode_jpeg decodes as PIL does


NEEDS_DALI = pytest.mark.needs("nvidia.dali", extra="dali")


@NEEDS_DALI
def test_dali_cpu_loader_gives_the_torch_loaders_samples(tmp_path: Path) -> None:
    """Same order, same draws (crop window, flip, colours), pixels within a few grey levels (DALI decodes)."""
    root = _photo_folder(tmp_path)
    train, val = imagenet_datasets(root, IMG)
    for dataset, train_split in ((train, True), (val, False)):
        kwargs = {"batch_size": 3, "train": train_split, "seed": 4, "dist_info": CPU}
        dali = DaliLoader(dataset, threads=1, **kwargs)  # type: ignore[arg-type]
        reference = make_loader(dataset, workers=0, **kwargs)
        set_epoch(dali, 1)
        set_epoch(reference, 1)
        assert len(dali) == len(reference) == (2 if train_split else 3)
        for ours, theirs in zip(dali, reference, strict=True):
            assert ours[0].dtype == torch.uint8 and ours[0].shape == theirs[0].shape
            diff = (ours[0].float() - theirs[0].float()).abs()
            assert diff.mean() < 0.5 and diff.max() <= 8
            assert all(torch.equal(a, b) for a, b in zip(ours[1:], theirs[1:], strict=True))


@NEEDS_DALI
def test_dali_refuses_ten_crop(tmp_path: Path) -> None:
    _, val = imagenet_datasets(_photo_folder(tmp_path), IMG, ten_crop=True)
    with pytest.raises(ConfigError, match="--ten-crop needs --loader torch or pil"):
        DaliLoader(val, batch_size=2, train=False, seed=0, dist_info=CPU, threads=1)  # type: ignore[arg-type]


# -- the recipes with each loader, and bad images -------------------------------------------------------------------

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_imagenet.py"


def _recipe(
    root: Path, output: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [
        "--data", str(root), "--output", str(output), "--arch", "resnet18", "--model-kwargs", TINY_MODEL,
        "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--no-share",  # one block a stage: nothing to share (a --share would say so on stderr)
        *extra,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(RECIPE), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.parametrize("loader", ["torch", "pil", pytest.param("dali", marks=NEEDS_DALI)])
def test_each_loader_feeds_the_recipe_every_image_once_with_its_label(loader: str, tmp_path: Path) -> None:
    import share_transform

    root = _photo_folder(tmp_path / "data")
    proc = _recipe(root, tmp_path / "run", "--loader", loader)
    assert proc.returncode == 0, proc.stderr
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["args"]["loader"] == loader
    # The epoch saw each of the 8 training images once (2 batches of 4), and evaluated each of the 8 val images once.
    assert (metrics["train_images"], metrics["val_images"]) == (8, 8)
    # The logged evaluation is the saved model's on the val images through the PIL reference pipeline (resize,
    # centre crop, normalise), each with its own folder's label: a loader that fed other images, crops, labels or
    # statistics would log another loss. Decoders and resizers differ by a few grey levels, hence the tolerance.
    model = share_transform.load(tmp_path / "run" / "checkpoint-last.safetensors").eval()
    val = ImageFolder(str(root / "val"), transform=eval_transform(32))
    images = torch.stack([val[i][0] for i in range(len(val))]).float() / 255
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    x = (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), labels).item()
    assert loss == pytest.approx(metrics["val_loss"], rel=0.02, abs=1e-3)


def _spoil(root: Path, case: str) -> Path:
    """Replace one training image by a bad file; return its path."""
    path = root / "train" / "china" / "1.jpg"
    good = path.read_bytes()
    if case == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif case == "not an image":
        path.write_bytes(b"this is not a JPEG at all")
    else:  # a decompression bomb: the header claims 40,000 x 40,000 pixels
        sof = good.index(b"\xff\xc0")
        path.write_bytes(good[: sof + 5] + struct.pack(">HH", 40_000, 40_000) + good[sof + 9 :])
    return path


@pytest.mark.parametrize(
    ("case", "flags"),
    [
        ("truncated", ("--loader", "torch")),
        ("not an image", ("--loader", "torch", "--workers", "2")),
        ("bomb", ("--loader", "torch", "--workers", "2")),
        ("truncated", ("--loader", "pil", "--workers", "2")),
        ("bomb", ("--loader", "pil")),
        pytest.param("truncated", ("--loader", "dali"), marks=NEEDS_DALI),
        pytest.param("bomb", ("--loader", "dali"), marks=NEEDS_DALI),
    ],
)
def test_a_bad_image_is_one_error_line_naming_the_file(case: str, flags: tuple[str, ...], tmp_path: Path) -> None:
    root = _photo_folder(tmp_path / "data")
    bad = _spoil(root, case)
    proc = _recipe(root, tmp_path / "run", *flags, "--batch-size", "8")  # one batch: every image is read
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {bad}: cannot decode the image"), (
        proc.stderr
    )
    assert "Traceback" not in proc.stdout + proc.stderr


def test_dali_loader_without_dali_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    root = _photo_folder(tmp_path / "data")
    # A Python where nvidia.dali cannot be imported (as without the extra installed).
    blocker = tmp_path / "site"
    (blocker / "nvidia").mkdir(parents=True)
    (blocker / "nvidia" / "__init__.py").write_text("")
    (blocker / "nvidia" / "dali.py").write_text("raise ImportError('No module named nvidia.dali')\n")
    path = os.pathsep.join([str(blocker), str(Path(__file__).resolve().parents[1])])
    proc = _recipe(root, tmp_path / "run", "--loader", "dali", env={"PYTHONPATH": path})
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --loader dali needs NVIDIA DALI (nvidia-dali-cuda120): pip install 'share-transform[dali]' "
        "(or --loader torch)\n"
    )
    assert not (tmp_path / "run").exists()


def test_gpu_check_refuses_without_a_gpu_in_one_line() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(script.parents[1])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "gpu_check: no CUDA device: run this on a machine with an NVIDIA GPU\n"
