"""ImageNet data as fb.resnet.torch prepared it (the recipe the paper trained with), for ``ImageFolder`` trees.

``DIR/train/CLASS/*.JPEG`` and ``DIR/val/CLASS/*.JPEG`` (the usual layout after ``valprep.sh``).
Constants in docs/design.md, Training protocols (fb.resnet.torch ``datasets/imagenet.lua``): training
takes a random-resized crop to ``img_size`` (area 0.08-1, aspect 3/4-4/3), colour jitter of brightness,
contrast and saturation 0.4 in random order, PCA lighting (AlexNet-style, alphastd 0.1), normalisation,
and a horizontal flip with p=0.5; evaluation resizes the shorter side to ``img_size * 256 / 224`` (256 at
224) and takes the centre crop ``img_size`` (``ten_crop``: the 4 corners + centre and their mirrors,
``(10, 3, H, W)`` per image).

Two host pipelines (the recipes' ``--loader``; ``dali`` is :mod:`.dali`):

* ``torch`` (:class:`TrainImages`, :class:`EvalImages`): JPEGs decoded by ``torchvision.io.decode_jpeg``
  (other formats by PIL), crop and flip on uint8 tensors. A sample carries its jitter and lighting draws
  (:func:`colour_draws`) to the device, where :class:`share_transform.train.loop.ColourAugment` applies
  them to the whole batch in float32 before normalising. Every draw comes from the generator of the
  sample's ``(seed, epoch, index)``, so the augmentation is a pure function of them.
* ``pil`` (:func:`train_transform`, :func:`eval_transform`): the reference, everything on the host with
  PIL and torchvision's transforms on torch's global generator (lighting on the uint8 crop, rounded back).

An undecodable file or a decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) raises a
:class:`DataError` naming the file, under either pipeline.

Example:
    >>> train_set, val_set = imagenet_datasets("/data/imagenet", img_size=224)
    >>> preprocess = ColourAugment(Normalize(MEAN, STD, scale=1.0, channels_last=True))
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from share_transform.train.errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
JITTER = 0.4
LIGHTING_STD = 0.1
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: Attempts at an in-bounds random crop before falling back to the centre one (torchvision's number).
CROP_ATTEMPTS = 10
#: The per-sample colour draws (:func:`colour_draws`): 3 jitter factors, the order of the 3 jitters, 3 alphas.
COLOUR_DRAWS = 9


class Lighting:
    """PCA lighting noise (Krizhevsky et al. 2012): add ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, std)``.

    Works on a ``(3, H, W)`` image, float in [0, 1] or uint8 in [0, 255] (then rounded and clamped back
    to uint8); ``alpha`` is drawn from torch's CPU generator, one draw per image.
    """

    def __init__(self, alphastd: float = LIGHTING_STD) -> None:
        self.alphastd = alphastd
        self.eigval = torch.tensor(PCA_EIGVAL)
        self.eigvec = torch.tensor(PCA_EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.empty(3).normal_(0.0, self.alphastd)
        rgb = self.eigvec @ (alpha * self.eigval)  # offset per channel, in [0, 1] units
        if img.dtype == torch.uint8:
            out = img.float().add_((rgb * 255.0).view(3, 1, 1))
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return img + rgb.view(3, 1, 1).to(img.dtype)


def eval_resize(img_size: int) -> int:
    """Shorter side before the centre crop: 256 for 224, in proportion otherwise."""
    return round(img_size * 256 / 224)


def eval_size(height: int, width: int, img_size: int) -> tuple[int, int]:
    """``(height, width)`` after evaluation's resize of the shorter side (torchvision's rounding)."""
    short, long = sorted((height, width))
    new_short, new_long = eval_resize(img_size), int(eval_resize(img_size) * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def train_transform(img_size: int) -> T.Compose:
    """The ``pil`` reference: PIL image -> augmented uint8 ``(3, img_size, img_size)`` (fb.resnet.torch's order)."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=CROP_SCALE, ratio=CROP_RATIO),
            T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),  # applied in random order
            T.PILToTensor(),
            Lighting(LIGHTING_STD),
            T.RandomHorizontalFlip(),
        ]
    )


def _open_checked(path: str, data: bytes) -> Image.Image:
    """The lazily opened image (header read only), refusing files too big to decode safely."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    return image


def read_image(path: str) -> torch.Tensor:
    """Decode ``path`` to uint8 RGB ``(3, H, W)``: JPEGs with ``torchvision.io.decode_jpeg``, others with PIL.

    Raises:
        DataError: naming ``path``, when it cannot be read or decoded, or has more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = _open_checked(path, data)
        if image.format == "JPEG":
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return F.pil_to_tensor(image.convert("RGB"))
    except Exception as e:  # PIL, libjpeg and the OS fail in many ways; every one means this file is bad
        raise DataError(f"{path}: cannot decode the image ({type(e).__name__}: {_first_line(e)})") from None


def image_size(path: str, data: bytes) -> tuple[int, int]:
    """``(height, width)`` from the file's header, with :func:`read_image`'s checks and error."""
    try:
        width, height = _open_checked(path, data).size
    except Exception as e:
        raise DataError(f"{path}: cannot decode the image ({type(e).__name__}: {_first_line(e)})") from None
    return height, width


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop (torchvision's algorithm), drawn from ``generator``.

    Area a uniform fraction of :data:`CROP_SCALE`, aspect log-uniform in :data:`CROP_RATIO`; up to
    :data:`CROP_ATTEMPTS` tries to fit the image, then the centre crop of the nearest allowed aspect.
    """
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for u_area, u_ratio, u_top, u_left in torch.rand(CROP_ATTEMPTS, 4, generator=generator).tolist():
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def colour_draws(generator: torch.Generator, *, jitter: float = JITTER, alphastd: float = LIGHTING_STD) -> torch.Tensor:
    """One sample's colour draws, float32 ``(9,)``, for :class:`~share_transform.train.loop.ColourAugment`.

    ``[brightness, contrast, saturation]`` factors uniform in ``[1 - jitter, 1 + jitter]``, the order of
    the three jitters (a permutation of 0, 1, 2), and the lighting's three ``alpha ~ N(0, alphastd)``.
    """
    u = torch.rand(3, generator=generator)
    order = torch.randperm(3, generator=generator)
    alpha = torch.randn(3, generator=generator) * alphastd
    return torch.cat([1 - jitter + 2 * jitter * u, order.float(), alpha])


class _Folder(Dataset):
    """An ImageFolder's file list and classes, read with :func:`read_image`."""

    def __init__(self, root: Path) -> None:
        folder = _image_folder(root, None)
        self.samples: list[tuple[str, int]] = folder.samples
        self.classes: list[str] = folder.classes

    def __len__(self) -> int:
        return len(self.samples)


class TrainImages(_Folder):
    """The ``torch`` training pipeline: ``(uint8 crop (3, s, s), colour draws (9,), target)`` per sample."""

    def __init__(self, root: Path, img_size: int) -> None:
        super().__init__(root)
        self.img_size = img_size

    def augmented_sample(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, target = self.samples[index]
        image = read_image(path)
        top, left, h, w = crop_box(image.shape[1], image.shape[2], generator)
        image = F.resized_crop(image, top, left, h, w, [self.img_size, self.img_size], antialias=True)
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return image, colour_draws(generator), target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.augmented_sample(index, torch.default_generator)


class EvalImages(_Folder):
    """The ``torch`` evaluation pipeline: ``(uint8 centre crop (3, s, s) or ten crops (10, 3, s, s), target)``."""

    def __init__(self, root: Path, img_size: int, *, ten_crop: bool = False) -> None:
        super().__init__(root)
        self.img_size = img_size
        self.ten_crop = ten_crop

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        image = F.resize(read_image(path), [eval_resize(self.img_size)], antialias=True)
        if self.ten_crop:
            return torch.stack(F.ten_crop(image, [self.img_size, self.img_size])), target
        return F.center_crop(image, [self.img_size, self.img_size]), target


def _stack_crops(crops: tuple) -> torch.Tensor:
    return torch.stack([T.functional.pil_to_tensor(c) for c in crops])


def eval_transform(img_size: int, *, ten_crop: bool = False) -> T.Compose:
    """The ``pil`` evaluation: PIL image -> uint8 ``(3, s, s)`` centre crop, or ``(10, 3, s, s)`` with ``ten_crop``."""
    resize = T.Resize(eval_resize(img_size))
    if ten_crop:
        return T.Compose([resize, T.TenCrop(img_size), T.Lambda(_stack_crops)])
    return T.Compose([resize, T.CenterCrop(img_size), T.PILToTensor()])


def _pil_loader(path: str) -> Image.Image:
    """The ``pil`` pipeline's reader: :func:`read_image`'s checks and error, then PIL's decode."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = _open_checked(path, data)
        return image.convert("RGB")
    except Exception as e:
        raise DataError(f"{path}: cannot decode the image ({type(e).__name__}: {_first_line(e)})") from None


def _image_folder(root: Path, transform: T.Compose | None) -> datasets.ImageFolder:
    if not root.is_dir():
        raise DataError(f"{root} is missing: expected an ImageFolder tree {root}/CLASS/IMAGE")
    try:
        return datasets.ImageFolder(str(root), transform=transform, loader=_pil_loader)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise DataError(f"{root}: {e}") from None


def imagenet_datasets(
    data: str | Path, img_size: int, *, ten_crop: bool = False, loader: str = "torch"
) -> tuple[Dataset, Dataset]:
    """``(train, val)`` datasets of ``data/train`` and ``data/val`` for ``loader`` ("torch"|"pil"), checked.

    The ``torch`` training set returns ``(image, colour draws, target)``; see the module docstring.

    Raises:
        DataError: ``data`` missing or empty, ``train/`` or ``val/`` absent or without images, or the
            two splits naming different classes.
    """
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    if not any(root.iterdir()):
        raise DataError(f"data directory {root} is empty: expected {root}/train/CLASS/IMAGE and {root}/val/CLASS/IMAGE")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        found = ", ".join(sorted(p.name + "/" for p in root.iterdir() if p.is_dir())) or "no folders"
        raise DataError(
            f"{root} has no {' or '.join(m + '/' for m in missing)} (found {found}): expected "
            f"{root}/train/CLASS/IMAGE and {root}/val/CLASS/IMAGE"
        )
    train: Any
    val: Any
    if loader == "pil":
        train = _image_folder(root / "train", train_transform(img_size))
        val = _image_folder(root / "val", eval_transform(img_size, ten_crop=ten_crop))
    else:
        train = TrainImages(root / "train", img_size)
        val = EvalImages(root / "val", img_size, ten_crop=ten_crop)
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(f"{root}: train/ and val/ name different classes (e.g. {', '.join(only)})")
    return train, val
