"""CIFAR-10 / CIFAR-100 for the ShaResNet CIFAR experiments: files, preprocessing, datasets.

* Files: the standard CIFAR "python version" layout (``cifar-10-batches-py/data_batch_1..5, test_batch,
  batches.meta``; ``cifar-100-python/train, test, meta``), read with a restricted unpickler that only
  rebuilds dicts, lists, strings and numpy arrays, so a tampered file cannot run code. :func:`write_cifar`
  writes the same layout (tests and the digits experiment use it); :func:`download_cifar` fetches the real
  sets through torchvision where the machine has network.
* Preprocessing, both fitted on the training set only and saved with the run (:func:`save_preprocessing`),
  so evaluation and ``--resume`` use the training set's statistics:

  - ``"zca"``: the paper's inputs (Sec. 4.3: "whitened data from PyLearn2" + random horizontal flip):
    pylearn2's ``make_cifar10_gcn_whitened`` recipe, i.e. global contrast normalisation (each image minus
    its mean, scaled to L2 norm 55) then ZCA whitening with ``filter_bias`` 0.1.
  - ``"meanstd"``: the WRN authors' default: per-channel mean/std, 4-pixel reflection pad, random 32x32
    crop, horizontal flip; or, as the soft-sharing reference (lolemacs/soft-sharing), a pad of black pixels
    (``pad="zero"``) and Cutout (DeVries & Taylor 2017: one ``cutout`` x ``cutout`` square, centred anywhere
    in the image and clipped at its border, set to 0 after normalisation, i.e. to the mean colour).
* A held-out split (``val_split``): that many training images, chosen from the seed, kept out of training
  and out of the preprocessing fit, to choose the best checkpoint on instead of the test set.

Papers:
* `ShaResNet: reducing residual network parameter number by sharing weights` - https://arxiv.org/abs/1702.08782
* `Wide Residual Networks` - https://arxiv.org/abs/1605.07146
* `Learning Multiple Layers of Features from Tiny Images` (Krizhevsky, 2009) - the CIFAR sets and ZCA.

Example::

    data = load_cifar("~/data", "cifar10", preprocess="zca")
    save_preprocessing(data.preprocessing, "runs/wrn/preprocess.safetensors")
    loader = torch.utils.data.DataLoader(data.train, batch_size=128, shuffle=True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from share_transform.fs import atomic_write
from share_transform.train.errors import DataError

from .sampling import sample_seeds, splitmix64

__all__ = [
    "CIFAR_DIRS",
    "ZCA",
    "ChannelNorm",
    "CifarData",
    "CifarDataset",
    "CifarInput",
    "CifarSplit",
    "DataError",
    "Preprocessing",
    "download_cifar",
    "fit_preprocessing",
    "global_contrast_normalize",
    "holdout_indices",
    "load_cifar",
    "load_preprocessing",
    "read_cifar",
    "save_preprocessing",
    "synthetic_cifar",
    "write_cifar",
    "zca_cache_path",
]

DatasetName = Literal["cifar10", "cifar100"]

#: Folder of each set inside ``--data``, as the official archives unpack.
CIFAR_DIRS: dict[str, str] = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_TRAIN_FILES = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
_TEST_FILES = {"cifar10": ["test_batch"], "cifar100": ["test"]}
_META_FILE = {"cifar10": "batches.meta", "cifar100": "meta"}
_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
_CLASS_KEY = {"cifar10": "label_names", "cifar100": "fine_label_names"}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_IMAGE_BYTES = 3 * 32 * 32

#: pylearn2's CIFAR whitening constants (``CIFAR10(gcn=55.)`` then ``ZCA(filter_bias=0.1)``).
GCN_SCALE = 55.0
ZCA_FILTER_BIAS = 0.1
#: How the random crop pads: mirrored pixels (the WRN code) or black pixels (torchvision's RandomCrop(32,
#: padding=4), the soft-sharing reference's).
PADS = ("reflect", "zero")
#: The stream of :func:`sample_seeds` that orders the training images for :func:`holdout_indices` (epochs are >= 0;
#: -1 is the synthetic images').
_HOLDOUT_STREAM = -2


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only builtins containers and numpy arrays: the CIFAR files hold nothing else."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles store the arrays' raw bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR file holds only arrays")


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1 reads the official Python 2 pickles (and their numpy buffers) with str keys.
            obj = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same here
        raise DataError(f"{path} is not a CIFAR python-format file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python-format file (holds {type(obj).__name__}, not a dict)")
    return obj


@dataclass(frozen=True)
class CifarSplit:
    """One split as stored: ``images`` uint8 (N, 32, 32, 3) HWC RGB, ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def find_cifar_dir(root: str | os.PathLike[str], dataset: str) -> Path:
    """The folder holding ``dataset``'s files: ``root/<official name>``, or ``root`` itself."""
    name = _check_name(dataset)
    root = Path(root).expanduser()
    for candidate in (root / CIFAR_DIRS[name], root):
        if (candidate / _META_FILE[name]).is_file():
            return candidate
    raise DataError(
        f"no {name} data under {root}: expected {root / CIFAR_DIRS[name]}/{_META_FILE[name]} "
        f"(the python version of the set); pass --download to fetch it, or point --data at its parent folder"
    )


def read_cifar(root: str | os.PathLike[str], dataset: str, *, train: bool) -> CifarSplit:
    """Read the training (``train=True``) or test split of ``dataset`` ("cifar10"|"cifar100") under ``root``.

    Raises :class:`DataError` when a file is missing, is not a CIFAR pickle, or holds arrays of the wrong
    shape or labels out of range. Sizes are not checked against 50,000/10,000, so small generated sets work.
    """
    name = _check_name(dataset)
    folder = find_cifar_dir(root, name)
    classes = tuple(str(c) for c in _unpickle(folder / _META_FILE[name]).get(_CLASS_KEY[name], ()))
    if len(classes) != _NUM_CLASSES[name]:
        raise DataError(
            f"{folder / _META_FILE[name]}: expected {_NUM_CLASSES[name]} class names "
            f"under {_CLASS_KEY[name]!r}, found {len(classes)}"
        )
    images, labels = [], []
    for file in (_TRAIN_FILES if train else _TEST_FILES)[name]:
        path = folder / file
        if not path.is_file():
            raise DataError(
                f"{name}: {path} is missing (an incomplete download?); delete {folder} and "
                f"fetch it again with --download"
            )
        batch = _unpickle(path)
        try:
            data = np.asarray(batch["data"])
            label = np.asarray(batch[_LABEL_KEY[name]], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}: expected uint8 'data' and '{_LABEL_KEY[name]}' entries ({e})") from e
        if data.dtype != np.uint8:  # a cast would wrap or truncate pixel values without a word
            raise DataError(f"{path}: 'data' must hold uint8 pixels, got {data.dtype}")
        if data.ndim != 2 or data.shape[1] != _IMAGE_BYTES or label.shape != (data.shape[0],):
            raise DataError(
                f"{path}: expected data (N, {_IMAGE_BYTES}) and labels (N,), got {data.shape} and {label.shape}"
            )
        images.append(data)
        labels.append(label)
    all_labels = np.concatenate(labels)
    if all_labels.size == 0:
        raise DataError(f"{folder}: the {'training' if train else 'test'} split is empty")
    if all_labels.min() < 0 or all_labels.max() >= len(classes):
        raise DataError(f"{folder}: labels outside 0..{len(classes) - 1}")
    # Rows are channel-major (1024 R, 1024 G, 1024 B); keep HWC like torchvision's CIFAR10.
    hwc = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return CifarSplit(np.ascontiguousarray(hwc), all_labels, classes)


def write_cifar(
    root: str | os.PathLike[str],
    dataset: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str] | None = None,
) -> Path:
    """Write ``(images, labels)`` pairs in the official python layout under ``root``; return the set's folder.

    ``images`` are uint8 (N, 32, 32, 3) HWC RGB. CIFAR-10's training split is cut into its five batch files;
    CIFAR-100 labels are written as fine labels (coarse labels as 0). The result reads back with
    :func:`read_cifar` (torchvision's readers take the same layout but also check the official md5s).
    """
    name = _check_name(dataset)
    n_classes = _NUM_CLASSES[name]
    classes = list(classes) if classes is not None else [f"class_{i}" for i in range(n_classes)]
    if len(classes) != n_classes:
        raise DataError(f"{name} needs {n_classes} class names, got {len(classes)}")
    folder = Path(root) / CIFAR_DIRS[name]
    folder.mkdir(parents=True, exist_ok=True)

    def rows(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or labels.shape != images.shape[:1]:
            raise DataError(
                f"write_cifar wants uint8 images (N, 32, 32, 3) and labels (N,), got "
                f"{images.dtype} {images.shape} and {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise DataError(f"labels must lie in 0..{n_classes - 1}")
        return images.transpose(0, 3, 1, 2).reshape(len(images), -1), [int(v) for v in labels]

    def dump(file: str, obj: dict[str, Any]) -> None:
        with open(folder / file, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    train_rows, train_labels = rows(*train)
    test_rows, test_labels = rows(*test)
    if name == "cifar10":
        dump(
            "batches.meta",
            {"label_names": classes, "num_cases_per_batch": -(-len(train_labels) // 5), "num_vis": _IMAGE_BYTES},
        )
        for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
            dump(
                f"data_batch_{i}",
                {
                    "batch_label": f"training batch {i} of 5",
                    "data": train_rows[part],
                    "labels": [train_labels[j] for j in part],
                },
            )
        dump("test_batch", {"batch_label": "testing batch 1 of 1", "data": test_rows, "labels": test_labels})
    else:
        dump("meta", {"fine_label_names": classes, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
        for file, data, labels in (("train", train_rows, train_labels), ("test", test_rows, test_labels)):
            dump(file, {"batch_label": file, "data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)})
    return folder


def download_cifar(root: str | os.PathLike[str], dataset: str) -> Path:
    """Fetch ``dataset`` into ``root`` through torchvision (checksummed); return the set's folder."""
    from torchvision.datasets import CIFAR10, CIFAR100

    name = _check_name(dataset)
    try:
        (CIFAR10 if name == "cifar10" else CIFAR100)(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
        raise DataError(
            f"could not download {name} into {root}: {e}; fetch the python version by hand "
            f"from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there"
        ) from e
    return find_cifar_dir(root, name)


def _check_name(dataset: str) -> DatasetName:
    if dataset not in CIFAR_DIRS:
        raise DataError(f"unknown dataset {dataset!r}: expected one of {', '.join(CIFAR_DIRS)}")
    return dataset  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------


def global_contrast_normalize(x: torch.Tensor, scale: float = GCN_SCALE) -> torch.Tensor:
    """pylearn2's GCN: per image (row of ``x``), subtract its mean and rescale to L2 norm ``scale``."""
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    # A flat image has norm 0: leave it at zero rather than divide by it (pylearn2's min_divisor).
    return x * (scale / torch.where(norm < 1e-8, torch.ones_like(norm), norm))


def _gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``x.T @ x``, each off-diagonal block computed once (the product is symmetric): 5/8 of the work."""
    d = x.shape[1]
    parts = x.split(-(-d // blocks), dim=1)
    out = torch.empty(d, d, dtype=x.dtype)
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.shape[1])
    for i, a in enumerate(parts):
        for j in range(i, len(parts)):
            block = a.T @ parts[j]
            out[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = block
            out[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = block.T
    return out


@dataclass(frozen=True)
class ZCA:
    """ZCA whitening of flattened images: ``(x - mean) @ matrix``, ``matrix = U diag(1/sqrt(s + eps)) U^T``.

    ``U, s`` are the eigenvectors/values of the training set's covariance (after GCN when ``gcn_scale`` is
    set). ``epsilon`` (pylearn2's ``filter_bias``) keeps the near-zero directions from blowing up: the
    whitened covariance is ``U diag(s / (s + eps)) U^T``, the identity as ``eps -> 0``.
    """

    mean: torch.Tensor  # (D,)
    matrix: torch.Tensor  # (D, D), symmetric
    epsilon: float
    gcn_scale: float | None

    kind = "zca"
    #: The paper's augmentation on whitened inputs: horizontal flips, no crops.
    crop = False

    @classmethod
    def fit(cls, x: torch.Tensor, *, epsilon: float = ZCA_FILTER_BIAS, gcn_scale: float | None = GCN_SCALE) -> ZCA:
        """Fit on images ``x`` (N, C, H, W), values in [0, 1].

        The data and its covariance stay in float32 (the O(N D^2) part); only the D x D eigendecomposition
        runs in float64, where float32 would shift the small eigenvalues by about 1e-4 of the largest and
        the whitened data by up to 1e-2. The whitened data stay within 1e-4 of an all-float64 fit.
        """
        flat = x.reshape(len(x), -1).float()
        if gcn_scale is not None:
            flat = global_contrast_normalize(flat, gcn_scale)
        mean = flat.double().mean(dim=0).float()
        centred = flat - mean
        n, d = centred.shape
        if n < d:
            # Fewer images than pixels (small sets): the covariance has rank < n, and a thin SVD of the data
            # gives its eigenvectors in O(n^2 d) instead of eigh's O(d^3); the null space scales by eps^-1/2.
            _, singular, vt = torch.linalg.svd(centred.double(), full_matrices=False)
            scale = (singular.square() / n + epsilon).rsqrt() - epsilon**-0.5
            matrix = epsilon**-0.5 * torch.eye(d, dtype=torch.float64) + (vt.T * scale) @ vt
        else:
            eigval, eigvec = torch.linalg.eigh(_gram(centred).double() / n)
            # eigh can return tiny negative eigenvalues for a rank-deficient covariance. The product back is
            # float32: its rounding is far below the tolerance, and it is a D^3 product too.
            vectors = eigvec.float()
            matrix = (vectors * (eigval.clamp_min(0) + epsilon).rsqrt().float()) @ vectors.T
        return cls(mean, matrix.float(), float(epsilon), gcn_scale)

    def __call__(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Whiten images ``x`` (N, C, H, W), float in [0, 1] or uint8; same shape out, float32, on ``x``'s device."""
        mean, matrix = self.mean.to(x.device), self.matrix.to(x.device)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for i in range(0, len(x), batch_size):  # bounded memory on the full 50,000-image set
            out[i : i + batch_size] = self.whiten(x[i : i + batch_size], mean, matrix)
        return out

    def whiten(self, x: torch.Tensor, mean: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """:meth:`__call__` of one batch with ``mean`` and ``matrix`` already on ``x``'s device."""
        flat = x.reshape(len(x), -1).float()
        if x.dtype == torch.uint8:
            flat = flat.div_(255.0)
        if self.gcn_scale is not None:
            flat = global_contrast_normalize(flat, self.gcn_scale)
        return ((flat - mean) @ matrix).reshape(x.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "matrix": self.matrix}

    def metadata(self) -> dict[str, str]:
        return {"epsilon": repr(self.epsilon), "gcn_scale": json.dumps(self.gcn_scale)}

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> ZCA:
        return cls(tensors["mean"], tensors["matrix"], float(metadata["epsilon"]), json.loads(metadata["gcn_scale"]))


@dataclass(frozen=True)
class ChannelNorm:
    """Per-channel ``(x - mean) / std`` with the training set's statistics (the WRN authors' default)."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    kind = "meanstd"
    #: The WRN augmentation: 4-pixel reflection pad + random 32x32 crop (and flips).
    crop = True

    @classmethod
    def fit(cls, x: torch.Tensor) -> ChannelNorm:
        """Fit on images ``x`` (N, C, H, W), values in [0, 1]."""
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        return cls(per_channel.mean(dim=1).float(), per_channel.std(dim=1).float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean[:, None, None]) / self.std[:, None, None]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    def metadata(self) -> dict[str, str]:
        return {}

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> ChannelNorm:
        return cls(tensors["mean"], tensors["std"])


Preprocessing = ZCA | ChannelNorm
_PREPROCESSING: dict[str, type[ZCA | ChannelNorm]] = {"zca": ZCA, "meanstd": ChannelNorm}


def fit_preprocessing(kind: str, images: torch.Tensor) -> Preprocessing:
    """Fit ``kind`` ("zca"|"meanstd") on training images (N, C, H, W) in [0, 1]."""
    if kind not in _PREPROCESSING:
        raise DataError(f"unknown preprocessing {kind!r}: expected one of {', '.join(_PREPROCESSING)}")
    return _PREPROCESSING[kind].fit(images)


def zca_cache_path(
    root: str | os.PathLike[str], dataset: str, held_out: np.ndarray | torch.Tensor | None = None
) -> Path:
    """Where :func:`load_cifar` caches the ZCA fitted on ``dataset``'s training files under ``root``.

    The name holds a SHA-256 of those files' bytes and of the ZCA constants (and of the ``held_out`` indices
    left out of the fit, when a split is held out), so any change to the training data (or to the constants)
    misses the cache and refits.
    """
    name = _check_name(dataset)
    folder = find_cifar_dir(root, name)
    digest = hashlib.sha256(f"zca {ZCA_FILTER_BIAS!r} {GCN_SCALE!r}".encode())
    if held_out is not None and len(held_out):
        digest.update(b"held out" + np.asarray(held_out, dtype=np.int64).tobytes())
    for file in _TRAIN_FILES[name]:
        with open(folder / file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return folder / f"zca-{digest.hexdigest()[:16]}.safetensors"


def _fit_or_cached(
    kind: str, images: np.ndarray, root: str | os.PathLike[str], dataset: str, held_out: np.ndarray | None = None
) -> Preprocessing:
    """Fit ``kind`` on the training images (uint8 HWC, the ``held_out`` ones already left out); a ZCA is read
    from, or written to, its cache beside them."""
    if kind != "zca":
        return fit_preprocessing(kind, _to_float(images))
    path = zca_cache_path(root, dataset, held_out)
    if path.is_file():
        try:
            cached = load_preprocessing(path)
        except DataError:
            cached = None  # a damaged cache is refitted and rewritten
        if isinstance(cached, ZCA):
            return cached
    fitted = fit_preprocessing(kind, _to_float(images))
    with contextlib.suppress(OSError):  # a read-only data folder: the run goes on without the cache
        save_preprocessing(fitted, path)
    return fitted


def save_preprocessing(preprocessing: Preprocessing, path: str | os.PathLike[str]) -> Path:
    """Write the fitted transform as safetensors (atomically: a crash leaves the old file or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"kind": preprocessing.kind, **preprocessing.metadata()}
    tensors = {k: v.contiguous() for k, v in preprocessing.tensors().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_preprocessing(path: str | os.PathLike[str]) -> Preprocessing:
    """Read a transform written by :func:`save_preprocessing`."""
    path = Path(path)
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        return _PREPROCESSING[metadata["kind"]].from_file(tensors, metadata)
    except FileNotFoundError:
        raise DataError(f"no preprocessing file at {path}") from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise DataError(
            f"{path} is not a preprocessing file written by share_transform ({e}); delete it to "
            f"refit on the training set"
        ) from e


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


class CifarDataset(Dataset[tuple[torch.Tensor, ...]]):
    """Images (N, C, H, W) held in memory, augmented a batch at a time.

    ``crop``: 4-pixel pad + random crop back to H x W; the pad mirrors the image (``pad="reflect"``) or is
    ``pad_fill`` per channel (``pad="zero"``: the value a black pixel has in the images' units). ``flip``:
    horizontal flip with p=0.5. ``cutout``: a ``cutout`` x ``cutout`` square set to 0, its centre anywhere in
    the image and clipped at the border, as the soft-sharing reference's ``Cutout(n_holes=1, length)``. All off
    for evaluation. A sample's crop offsets and flip are bits of its 63-bit seed, its Cutout centre bits of
    that seed's SplitMix64 hash (:meth:`augmented_batch`, which the recipes' loaders call with seeds of
    ``(seed, epoch, index)``); plain indexing draws that seed from torch's global generator.
    ``flip_on_device``: the flips are not applied but returned, ``(images, flips (B, 1) float, labels)``, for
    :class:`CifarInput` to apply after whitening on the device (Cutout then needs host flips).
    """

    #: Crop offsets per axis: 0..8 into the 4-pixel padded image.
    OFFSETS = 9

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        crop: bool = False,
        flip: bool = False,
        flip_on_device: bool = False,
        pad: str = "reflect",
        pad_fill: torch.Tensor | None = None,
        cutout: int = 0,
    ) -> None:
        if pad not in PADS:
            raise DataError(f"unknown pad {pad!r}; choose one of {', '.join(PADS)}")
        if cutout and flip_on_device:
            raise DataError("Cutout needs the flips on the host (flip_on_device=False): it is drawn after them")
        self.images = images
        self.labels = labels
        self.crop = crop
        self.flip = flip
        self.flip_on_device = flip_on_device
        self.pad = pad
        self.pad_fill = pad_fill if pad_fill is not None else torch.zeros(images.shape[1], dtype=images.dtype)
        self.cutout = cutout

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        seed = torch.randint(0, 2**62, (1,))
        return tuple(t[0] for t in self.augmented_batch(torch.tensor([index]), seed))

    def augmented_batch(self, indices: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(images, labels)`` of ``indices``; sample k's crop and flip are read from the bits of ``seeds[k]``.

        Bit 0 is the flip, bits 1-30 (mod 9) the row offset, bits 32-62 (mod 9) the column offset: one
        gather for the whole batch instead of a pad and a slice per image.
        """
        x = self.images[indices]
        if self.crop:
            n, c, h, w = x.shape
            if self.pad == "reflect":
                padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
            else:
                padded = self.pad_fill.to(x.dtype).view(1, c, 1, 1).expand(n, c, h + 8, w + 8).clone()
                padded[:, :, 4:-4, 4:-4] = x
            rows = ((seeds >> 1) & 0x3FFFFFFF) % self.OFFSETS
            cols = (seeds >> 32) % self.OFFSETS
            x = padded[
                torch.arange(n)[:, None, None, None],
                torch.arange(c)[None, :, None, None],
                (rows[:, None] + torch.arange(h))[:, None, :, None],
                (cols[:, None] + torch.arange(w))[:, None, None, :],
            ]
        if self.flip and self.flip_on_device:
            return x, (seeds & 1).float()[:, None], self.labels[indices]
        if self.flip:
            flipped = (seeds & 1).bool()
            x[flipped] = x[flipped].flip(-1)
        if self.cutout:
            x = self._cut_out(x, seeds)
        return x, self.labels[indices]

    def _cut_out(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Zero one ``cutout``-square per image: rows ``[y - L//2, y + L//2)`` clipped to the image, as the
        reference's ``Cutout`` (its centre ``y``, ``x`` uniform over the image)."""
        n, _, h, w = x.shape
        mixed = torch.from_numpy(splitmix64(seeds.numpy().astype(np.uint64)).view(np.int64))
        y = (mixed & 0xFFFFFFFF) % h
        cx = ((mixed >> 32) & 0x7FFFFFFF) % w
        half = self.cutout // 2
        rows, cols = torch.arange(h), torch.arange(w)
        inside_rows = (rows >= (y - half)[:, None]) & (rows < (y + half)[:, None])  # (n, h)
        inside_cols = (cols >= (cx - half)[:, None]) & (cols < (cx + half)[:, None])  # (n, w)
        hole = inside_rows[:, :, None] & inside_cols[:, None, :]
        if x.is_floating_point():
            return x * (~hole)[:, None].to(x.dtype)
        return x.masked_fill(hole[:, None], 0)


class CifarInput:
    """The device side of a CIFAR batch: ZCA whitening of uint8 images, then the loader's flips; or, for data
    already normalised on the host (mean/std), nothing but the memory format.

    ``__call__(images[, flips])``, ``flips`` (B, 1) from a ``flip_on_device`` :class:`CifarDataset`.

    Example:
        >>> to_input = data.device_input(channels_last=True)
        >>> x = to_input(images.cuda(), flips.cuda())
    """

    def __init__(self, preprocessing: Preprocessing, *, channels_last: bool = False) -> None:
        self.zca = preprocessing if isinstance(preprocessing, ZCA) else None
        # The ZCA's mean and matrix on the batches' device, moved there once.
        self.on_device: tuple[torch.Tensor, torch.Tensor] | None = (
            (self.zca.mean, self.zca.matrix) if self.zca is not None else None
        )
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
        x = images
        if self.zca is not None and self.on_device is not None:
            if self.on_device[1].device != x.device:
                self.on_device = (self.zca.mean.to(x.device), self.zca.matrix.to(x.device))
            x = self.zca.whiten(x, *self.on_device)
        if flips is not None:
            x = torch.where(flips.view(-1, 1, 1, 1) > 0, x.flip(-1), x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class CifarData:
    """What :func:`load_cifar` returns: the splits, ready for a DataLoader, and the fitted transform.

    ``val`` is the test split (the set's test files); ``holdout``, when a ``val_split`` was asked for, the
    training images held out of training (the held-out set that chooses the best checkpoint).
    """

    train: CifarDataset
    val: CifarDataset
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    holdout: CifarDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def device_input(self, *, channels_last: bool = False) -> CifarInput:
        """The device-side input transform of both splits' batches (ZCA whitening runs there)."""
        return CifarInput(self.preprocessing, channels_last=channels_last)


def load_cifar(
    root: str | os.PathLike[str],
    dataset: str,
    preprocess: str | Preprocessing = "zca",
    *,
    hflip: bool = True,
    download: bool = False,
    val_split: int = 0,
    seed: int = 0,
    pad: str = "reflect",
    cutout: int = 0,
) -> CifarData:
    """Read ``dataset`` under ``root`` and preprocess both splits with statistics of the training split.

    ``preprocess`` is a kind ("zca"|"meanstd"), fitted here on the training images (a ZCA fit is cached
    in the set's folder, see :func:`zca_cache_path`, so later runs skip it), or an already fitted
    transform (e.g. :func:`load_preprocessing` of the run's file on ``--resume``), used as is. The test split
    is always transformed with the training split's statistics. ``hflip=False`` drops the flips (for data
    where a mirror image changes the class, such as digits). ``download`` fetches the set first if absent.
    ``val_split``: hold that many training images out (:func:`holdout_indices` of ``seed``), out of training
    and of the transform's fit, as ``holdout``. ``pad`` and ``cutout``: the crop's padding (:data:`PADS`) and
    the Cutout size (0: none) of the training split's augmentation (``meanstd`` only: ZCA inputs train without
    crops).

    Raises:
        DataError: missing or malformed files, a ``val_split`` that leaves no training image, or Cutout or a
            ``pad`` other than reflect with ZCA inputs.
    """
    name = _check_name(dataset)
    if download:
        try:
            find_cifar_dir(root, name)
        except DataError:
            download_cifar(root, name)
    train, test = read_cifar(root, name, train=True), read_cifar(root, name, train=False)
    return _preprocessed(
        name, train, test, preprocess, hflip=hflip, cache_root=root, val_split=val_split, seed=seed, pad=pad,
        cutout=cutout,
    )  # fmt: skip


def synthetic_cifar(
    dataset: str,
    preprocess: str | Preprocessing = "zca",
    *,
    train_size: int,
    test_size: int,
    seed: int = 0,
    hflip: bool = True,
    val_split: int = 0,
    pad: str = "reflect",
    cutout: int = 0,
) -> CifarData:
    """Random uint8 images with random labels, in ``dataset``'s shape and classes, preprocessed as :func:`load_cifar`
    does: the recipe's whole pipeline without files, for ``--synthetic`` timing runs. A function of ``seed``.

    >>> data = synthetic_cifar("cifar100", "meanstd", train_size=256, test_size=64)
    >>> len(data.train), data.num_classes
    (256, 100)
    """
    name = _check_name(dataset)
    rng = np.random.default_rng(seed)
    classes = tuple(f"class_{i}" for i in range(_NUM_CLASSES[name]))

    def split(n: int) -> CifarSplit:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        return CifarSplit(images, rng.integers(0, len(classes), n, dtype=np.int64), classes)

    return _preprocessed(
        name, split(train_size), split(test_size), preprocess, hflip=hflip, cache_root=None, val_split=val_split,
        seed=seed, pad=pad, cutout=cutout,
    )  # fmt: skip


def holdout_indices(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)``: indices of ``count`` training images, ``size`` of them held out, both ascending.

    The images are ordered by the SplitMix64 hash of ``(seed, index)`` (:func:`sample_seeds`, a stream of its
    own) and the first ``size`` held out: a function of the seed alone, the same on every machine and rank.

    >>> kept, held_out = holdout_indices(10, 3, seed=0)
    >>> len(kept), len(held_out), sorted([*kept, *held_out]) == list(range(10))
    (7, 3, True)
    """
    order = np.argsort(sample_seeds(seed, _HOLDOUT_STREAM, np.arange(count)).numpy(), kind="stable")
    return np.sort(order[size:]), np.sort(order[:size])


def _preprocessed(
    name: str,
    train: CifarSplit,
    test: CifarSplit,
    preprocess: str | Preprocessing,
    *,
    hflip: bool,
    cache_root: str | os.PathLike[str] | None,
    val_split: int = 0,
    seed: int = 0,
    pad: str = "reflect",
    cutout: int = 0,
) -> CifarData:
    """The splits transformed with the training split's statistics: fitted now (a ZCA cached under
    ``cache_root``, when given), or ``preprocess`` as given; ``val_split`` training images held out first."""
    kind = preprocess if isinstance(preprocess, str) else preprocess.kind
    if kind == "zca" and (cutout or pad != "reflect"):
        raise DataError(
            "ZCA inputs train with flips only (the paper's): Cutout and --pad need --preprocess meanstd, whose "
            "training images are cropped"
        )
    if val_split < 0 or val_split >= len(train.labels):
        raise DataError(
            f"a held-out split of {val_split:,} images (--val-split) leaves no training image: the training split "
            f"holds {len(train.labels):,}"
        )
    holdout: CifarSplit | None = None
    held_out_indices = None
    if val_split:
        kept, held_out_indices = holdout_indices(len(train.labels), val_split, seed)
        holdout = CifarSplit(train.images[held_out_indices], train.labels[held_out_indices], train.classes)
        train = CifarSplit(train.images[kept], train.labels[kept], train.classes)
    if not isinstance(preprocess, str):
        transform = preprocess
    elif cache_root is None:
        transform = fit_preprocessing(preprocess, _to_float(train.images))
    else:
        transform = _fit_or_cached(preprocess, train.images, cache_root, name, held_out_indices)
    if transform.mean.numel() not in (3, train.images[0].size):
        raise DataError(
            f"the saved {transform.kind} transform has {transform.mean.numel()} features; "
            f"{name} images have {train.images[0].size}"
        )
    splits = [train, test] if holdout is None else [train, test, holdout]
    labels = [torch.from_numpy(s.labels) for s in splits]
    if isinstance(transform, ZCA):
        # Whitening is a (3072 x 3072) product per image: the device does it per batch (CifarInput), so the
        # datasets keep the bytes and start-up skips whitening 60,000 images on the host.
        raw = [torch.from_numpy(s.images).permute(0, 3, 1, 2).contiguous() for s in splits]
        train_set = CifarDataset(raw[0], labels[0], crop=transform.crop, flip=hflip, flip_on_device=True)
        others = [CifarDataset(x, y) for x, y in zip(raw[1:], labels[1:])]
    else:
        # A black pixel in the normalised units: what the reference's zero padding becomes after Normalize.
        black = transform(torch.zeros(1, train.images.shape[-1], 1, 1)).flatten()
        normalised = [transform(_to_float(s.images)) for s in splits]
        train_set = CifarDataset(
            normalised[0], labels[0], crop=transform.crop, flip=hflip, pad=pad, pad_fill=black, cutout=cutout
        )
        others = [CifarDataset(x, y) for x, y in zip(normalised[1:], labels[1:])]
    return CifarData(
        train=train_set,
        val=others[0],
        preprocessing=transform,
        classes=train.classes,
        holdout=others[1] if holdout is not None else None,
    )


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
