"""ImageNet data as fb.resnet.torch prepared it (the recipe the paper trained with), for ``ImageFolder`` trees.

``DIR/train/CLASS/*.JPEG`` and ``DIR/val/CLASS/*.JPEG`` (the usual layout after
``valprep.sh``). Host-side transforms stop at uint8 tensors; the device normalises
(:class:`share_transform.train.loop.Normalize` with :data:`MEAN`/:data:`STD`), so batches cross the bus
as bytes.

Training (fb.resnet.torch ``datasets/imagenet.lua``; constants in docs/design.md, Training protocols):
random-resized crop to ``img_size`` (area 0.08-1, aspect 3/4-4/3), colour jitter of brightness,
contrast and saturation 0.4 in random order, PCA lighting (AlexNet-style, alphastd 0.1), horizontal flip
with p=0.5. Lighting is applied to the uint8 crop and rounded back to uint8 (a change of at most half a
grey level against float arithmetic), so the host still ships bytes.

Evaluation: resize the shorter side to ``img_size * 256 / 224`` (256 at 224), centre crop ``img_size``;
``ten_crop`` gives the 4 corners + centre and their mirrors, shape ``(10, 3, H, W)`` per image.

Example:
    >>> train_set, val_set = imagenet_datasets("/data/imagenet", img_size=224)
    >>> preprocess = Normalize(MEAN, STD, channels_last=True)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms as T

from share_transform.errors import DataError

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


def train_transform(img_size: int) -> T.Compose:
    """PIL image -> augmented uint8 tensor ``(3, img_size, img_size)`` (fb.resnet.torch's order)."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=CROP_SCALE, ratio=CROP_RATIO),
            T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),  # applied in random order
            T.PILToTensor(),
            Lighting(LIGHTING_STD),
            T.RandomHorizontalFlip(),
        ]
    )


def _stack_crops(crops: tuple) -> torch.Tensor:
    return torch.stack([T.functional.pil_to_tensor(c) for c in crops])


def eval_transform(img_size: int, *, ten_crop: bool = False) -> T.Compose:
    """PIL image -> uint8 ``(3, s, s)`` centre crop, or ``(10, 3, s, s)`` with ``ten_crop``."""
    resize = T.Resize(eval_resize(img_size))
    if ten_crop:
        return T.Compose([resize, T.TenCrop(img_size), T.Lambda(_stack_crops)])
    return T.Compose([resize, T.CenterCrop(img_size), T.PILToTensor()])


def _image_folder(root: Path, transform: T.Compose) -> datasets.ImageFolder:
    if not root.is_dir():
        raise DataError(f"{root} is missing: expected an ImageFolder tree {root}/CLASS/IMAGE")
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise DataError(f"{root}: {e}") from None


def imagenet_datasets(data: str | Path, img_size: int, *, ten_crop: bool = False) -> tuple[Dataset, Dataset]:
    """``(train, val)`` ImageFolder datasets of ``data/train`` and ``data/val``, checked for use.

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
    train = _image_folder(root / "train", train_transform(img_size))
    val = _image_folder(root / "val", eval_transform(img_size, ten_crop=ten_crop))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(f"{root}: train/ and val/ name different classes (e.g. {', '.join(only)})")
    return train, val
