"""How much CPU does each input pipeline spend per training image? And the start-up costs beside it.

Builds an ImageFolder of realistic JPEGs (scikit-learn's two bundled photographs, cut into 500x375 crops
at quality 90), then measures, in process CPU time (all threads, so a busy shared machine does not skew
it), the ImageNet recipe's training sample per loader and per stage:

* ``torch`` (the default): ``decode_jpeg``, crop + flip on uint8, the per-sample generator and colour
  draws; the colour jitter + lighting + normalisation that the device runs per batch is timed here on
  the CPU, for information, and not counted in the loader's cost;
* ``pil``: the reference, PIL decode and torchvision's PIL transforms, all on the host;
* ``dali``: DALI's CPU backend (decode of the crop window, resize, flip), when DALI is installed;
* ``cifar``: the CIFAR loader (in memory, pad-crop-flip a batch at a time, batch 128).

Variants are measured alternately, in rounds; each figure is the median over rounds (min-max). It
prints CPU ms per image, images/s per core and the cores needed to feed 3,000 and 6,000 images/s, then
the ZCA start-up on a cache miss and hit (a CIFAR-sized set cut from the same photographs) and
plan+apply against create_model (``benchmarks/apply_speed.py``).

    python benchmarks/data_throughput.py [--threads 1] [--rounds 5] [--images 64] [--json] [--quick]

``--json`` prints one record per loader: ``loader``, ``ms_cpu_per_image``, ``img_per_s_per_core``,
``stages`` (ms per image), ``cores_for`` (3,000 and 6,000 images/s).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from share_transform.train import DistInfo, make_loader
from share_transform.train.data import load_cifar, write_cifar, zca_cache_path
from share_transform.train.data.cifar import CifarDataset
from share_transform.train.data.imagenet import (
    JITTER,
    MEAN,
    PCA_EIGVAL,
    PCA_EIGVEC,
    STD,
    Lighting,
    TrainImages,
    colour_draws,
    crop_box,
    imagenet_datasets,
    read_image,
)
from share_transform.train.data.sampling import SeededDataset, sample_seed
from share_transform.train.loop import ColourAugment, Normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apply_speed import pass_speed  # noqa: E402

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FEED_TARGETS = (3000, 6000)
IMG_SIZE = 224


def make_jpeg_folder(root: Path, images: int) -> Path:
    """``root/{train,val}/{china,flower}/*.jpg``: 500x375 crops of the bundled photos at quality 90."""
    rng = np.random.default_rng(0)
    photos = load_sample_images().images  # two 427x640 RGB photographs
    for split in ("train", "val"):
        for k in range(images):
            photo = photos[k % 2]
            top, left = rng.integers(0, photo.shape[0] - 375 + 1), rng.integers(0, photo.shape[1] - 500 + 1)
            crop = photo[top : top + 375, left : left + 500]
            if k % 4 >= 2:
                crop = crop[:, ::-1]
            folder = root / split / ("china", "flower")[k % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{k}.jpg", quality=90)
    return root


def cpu_ms_per_image(fn: Callable[[], int]) -> float:
    """Process CPU milliseconds per image of ``fn()``, which returns how many images it handled."""
    start = time.process_time()
    n = fn()
    return (time.process_time() - start) * 1000 / n


def loader_variants(root: Path, images: int) -> dict[str, dict[str, Callable[[], int]]]:
    """For each loader, its stages and its whole training sample, each a callable over every image."""
    train = TrainImages(root / "train", IMG_SIZE)
    paths = [p for p, _ in train.samples]
    decoded = [read_image(p) for p in paths]
    seeds = [sample_seed(0, 0, i) for i in range(len(paths))]
    seeded = SeededDataset(train, seed=0)
    pil_train, _ = imagenet_datasets(root, IMG_SIZE, loader="pil")
    pil_seeded = SeededDataset(pil_train, seed=0)
    pils = [Image.open(p).convert("RGB") for p in paths]
    crop_pil = T.RandomResizedCrop(IMG_SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    jitter_pil = T.ColorJitter(JITTER, JITTER, JITTER)
    crops_pil = [crop_pil(p) for p in pils]
    augment = ColourAugment(Normalize(MEAN, STD, scale=1.0), eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC)
    batch = torch.stack([train.augmented_sample(i, torch.Generator().manual_seed(s))[0] for i, s in enumerate(seeds)])
    draws = torch.stack([colour_draws(torch.Generator().manual_seed(s)) for s in seeds])

    def each(fn: Callable[[int], object]) -> Callable[[], int]:
        def run() -> int:
            for i in range(len(paths)):
                fn(i)
            return len(paths)

        return run

    def torch_crop(i: int) -> object:
        g = torch.Generator().manual_seed(seeds[i])
        img = decoded[i]
        top, left, h, w = crop_box(img.shape[1], img.shape[2], g)
        out = F.resized_crop(img, top, left, h, w, [IMG_SIZE, IMG_SIZE], antialias=True)
        return out.flip(-1) if torch.rand((), generator=g) < 0.5 else out

    def device_side() -> int:
        augment(batch, draws)
        return len(batch)

    variants: dict[str, dict[str, Callable[[], int]]] = {
        "torch": {
            "decode (decode_jpeg)": each(lambda i: read_image(paths[i])),
            "crop + flip (uint8)": each(torch_crop),
            "seed + colour draws": each(lambda i: colour_draws(torch.Generator().manual_seed(seeds[i]))),
            "sample": each(lambda i: seeded[(0, i)]),
            "[device side, on CPU] jitter+lighting+normalise": device_side,
        },
        "pil": {
            "decode (PIL)": each(lambda i: Image.open(paths[i]).convert("RGB")),
            "RandomResizedCrop": each(lambda i: crop_pil(pils[i])),
            "ColorJitter": each(lambda i: jitter_pil(crops_pil[i])),
            "to tensor + lighting": each(lambda i: Lighting()(F.pil_to_tensor(crops_pil[i]))),
            "sample": each(lambda i: pil_seeded[(0, i)]),
        },
    }
    dali = dali_variant(root, images)
    if dali is not None:
        variants["dali"] = {"sample": dali}
    variants["cifar"] = {"sample": cifar_variant()}
    return variants


def dali_variant(root: Path, images: int) -> Callable[[], int] | None:
    try:
        from share_transform.train.data.dali import DaliLoader
    except ImportError:
        return None
    try:
        loader = DaliLoader(
            TrainImages(root / "train", IMG_SIZE), batch_size=images // 2, train=True, seed=0, dist_info=CPU, threads=1
        )
    except Exception:  # ConfigError: DALI is not installed
        return None
    next(iter(loader))  # builds the pipeline outside the timing

    def run() -> int:
        return sum(len(b[-1]) for b in loader)

    return run


def cifar_variant(n: int = 50_000, batch: int = 128) -> Callable[[], int]:
    data = CifarDataset(torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,)), crop=True, flip=True)
    loader = make_loader(data, batch_size=batch, train=True, seed=0, dist_info=CPU, workers=0)
    limit = 20_000

    def run() -> int:
        seen = 0
        for _, y in loader:
            seen += len(y)
            if seen >= limit:
                break
        return seen

    return run


def zca_startup(root: Path) -> dict[str, float]:
    """CPU seconds of load_cifar(..., "zca") on a cache miss and a hit, for 50,000 + 10,000 natural 32x32 images."""
    rng = np.random.default_rng(1)
    photos = [np.asarray(p) for p in load_sample_images().images]
    scales = [p[:: 2**k, :: 2**k] for p in photos for k in range(3)]

    def cut(n: int) -> np.ndarray:
        out = np.empty((n, 32, 32, 3), dtype=np.uint8)
        for i in range(n):
            src = scales[i % len(scales)]
            top, left = rng.integers(0, src.shape[0] - 32), rng.integers(0, src.shape[1] - 32)
            out[i] = src[top : top + 32, left : left + 32]
        return out

    write_cifar(root, "cifar10", (cut(50_000), rng.integers(0, 10, 50_000)), (cut(10_000), rng.integers(0, 10, 10_000)))
    start = time.process_time()
    load_cifar(root, "cifar10", "zca")
    miss = time.process_time() - start
    assert zca_cache_path(root, "cifar10").is_file()
    start = time.process_time()
    load_cifar(root, "cifar10", "zca")
    return {"miss_s": miss, "hit_s": time.process_time() - start}


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU per core)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=64, help="JPEGs per split (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON record per loader instead of the table")
    parser.add_argument("--quick", action="store_true", help="skip the ZCA and plan+apply start-up figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(tmp) / "jpegs", args.images)
        variants = loader_variants(root, args.images)
        times: dict[tuple[str, str], list[float]] = {(lo, st): [] for lo, stages in variants.items() for st in stages}
        for _ in range(args.rounds):  # alternate: every variant once per round
            for loader, stages in variants.items():
                for stage, fn in stages.items():
                    times[loader, stage].append(cpu_ms_per_image(fn))
        records = []
        for loader, stages in variants.items():
            ms = statistics.median(times[loader, "sample"])
            records.append(
                {
                    "loader": loader,
                    "ms_cpu_per_image": ms,
                    "img_per_s_per_core": 1000 / ms,
                    "stages": {st: statistics.median(times[loader, st]) for st in stages if st != "sample"},
                    "cores_for": {str(t): t * ms / 1000 for t in FEED_TARGETS},
                }
            )
        if args.json:
            print(json.dumps(records, indent=2))
            return
        print(
            f"torch {torch.__version__}, {platform.machine()} CPU, {args.threads} thread(s), {args.rounds} rounds, "
            f"{args.images} JPEGs 500x375 q90, crop {IMG_SIZE}; CPU ms per image, median (min-max)"
        )
        for rec in records:
            loader = str(rec["loader"])
            cores = "  ".join(f"{c:.1f} cores for {t} img/s" for t, c in rec["cores_for"].items())  # type: ignore[attr-defined]
            print(
                f"{loader:6s} sample {fmt(times[loader, 'sample'])} ms  "
                f"{rec['img_per_s_per_core']:8.0f} img/s/core  {cores}"
            )
            for stage in rec["stages"]:  # type: ignore[attr-defined]
                print(f"         {stage:45s} {fmt(times[loader, stage])} ms")
        if args.quick:
            return
        zca = zca_startup(Path(tmp) / "cifar")
        print(
            f"ZCA start-up (50,000 + 10,000 images): cache miss {zca['miss_s']:.1f} s CPU, hit {zca['hit_s']:.1f} s CPU"
        )
    for name in ("resnet50", "resnet152"):
        pass_speed(name, args.rounds)


if __name__ == "__main__":
    main()
