"""``--loader dali``: the ImageNet recipe's input pipeline on NVIDIA DALI (the ``[dali]`` extra).

DALI decodes the JPEGs on the GPU's hardware JPEG decoder (``device="mixed"``) when training on CUDA, and
on its CPU backend otherwise (``device_id=None``: no GPU needed). Training: each sample's crop window
is decoded (``decoders.image_slice``, a region-of-interest decode), resized to ``img_size`` and flipped;
evaluation resizes the shorter side and takes the centre crop. Colour jitter, lighting and normalisation
are the ``torch`` loader's device-side :class:`~share_transform.train.loop.ColourAugment`.

Order and randomness are the ``torch`` loader's: the same sampler (this rank's shard of the ``(seed,
epoch)`` permutation) and, per sample, the same generator of ``(seed, epoch, index)`` drawing the crop
window (:func:`~.imagenet.crop_box`), the flip and the colour draws in the same sequence. So a sample's
augmentation is a pure function of ``(seed, epoch, index)`` here too, and a resumed run is **epoch-exact**:
it replays the interrupted epoch's samples, order, crop windows, flips and colour draws. The pixels are
DALI's (its decoder and resampling), within a few grey levels of the ``torch`` loader's, not bit-equal;
DALI's CPU backend gives the same pixels on every run, the GPU decoder is not promised to.

The files are read in Python and fed to the pipeline batch by batch (an external source): DALI's own file
reader shuffles with its own generator and cannot follow the ``(seed, epoch)`` order.

Example:
    >>> loader = DaliLoader(TrainImages(root / "train", 224), batch_size=256, train=True, seed=0,
    ...                     dist_info=info, threads=8)
    >>> set_epoch(loader, 0)
    >>> for images, draws, targets in loader: ...
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..distributed import DistInfo
from ..errors import ConfigError, DataError
from .imagenet import EvalImages, TrainImages, colour_draws, crop_box, eval_size, image_size, read_image
from .sampling import EpochSampler, index_sampler, sample_seed


def require_dali() -> Any:
    """The ``nvidia.dali`` module; a :class:`ConfigError` naming the extra to install when it is absent."""
    try:
        import nvidia.dali
    except ImportError:
        raise ConfigError(
            "--loader dali needs NVIDIA DALI (nvidia-dali-cuda120): pip install 'share-transform[dali]'"
            " (or --loader torch)"
        ) from None
    return nvidia.dali


class DaliLoader:
    """Batches of ``(uint8 images (B, 3, s, s), colour draws (B, 9), targets)`` (training) or ``(images, targets)``.

    Used like a loader from :func:`~.sampling.make_loader`: ``len()``, iteration, and ``set_epoch``
    through its ``sampler``. Images come on the training device (CUDA) or the CPU.

    Raises:
        ConfigError: DALI is not installed, or ``ten_crop`` (DALI evaluates the centre crop only).
        DataError: while iterating, naming the file DALI could not decode.
    """

    def __init__(
        self,
        dataset: TrainImages | EvalImages,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        dist_info: DistInfo,
        threads: int,
    ) -> None:
        require_dali()
        if isinstance(dataset, EvalImages) and dataset.ten_crop:
            raise ConfigError("--ten-crop needs --loader torch or pil: the dali loader evaluates the centre crop")
        self.samples = dataset.samples
        self.img_size = dataset.img_size
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.device = dist_info.device
        self.threads = max(1, threads)
        self.sampler = EpochSampler(index_sampler(len(self.samples), train=train, seed=seed, dist_info=dist_info))
        self._pipe: Any = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        keys = list(self.sampler)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self._batch(keys[start : start + self.batch_size])

    def _batch(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        pipe = self._pipeline()
        paths = [self.samples[index][0] for _, index in keys]
        targets = torch.tensor([self.samples[index][1] for _, index in keys])
        encoded = []
        for path in paths:
            with open(path, "rb") as f:
                encoded.append(np.frombuffer(f.read(), dtype=np.uint8))
        pipe.feed_input("encoded", encoded)
        sizes = [image_size(path, data.tobytes()) for path, data in zip(paths, encoded, strict=True)]
        draws = []
        windows = []  # (left, top, w, h) of each sample's crop, in DALI's (W, H) order
        if self.train:
            flips = []
            for (epoch, index), (height, width) in zip(keys, sizes, strict=True):
                # The draws of TrainImages.augmented_sample, in its order: crop window, flip, colours.
                g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
                top, left, h, w = crop_box(height, width, g)
                windows.append((left, top, w, h))
                flips.append(np.array(int(torch.rand((), generator=g) < 0.5), dtype=np.int32))
                draws.append(colour_draws(g))
            pipe.feed_input("flip", flips)
        else:
            # torchvision's sizes and centre offsets exactly, so that both loaders evaluate the same pixels.
            resized = [eval_size(height, width, self.img_size) for height, width in sizes]
            pipe.feed_input("resize_x", [np.array(w, dtype=np.float32) for _, w in resized])
            pipe.feed_input("resize_y", [np.array(h, dtype=np.float32) for h, _ in resized])
            c = self.img_size
            windows = [(round((w - c) / 2), round((h - c) / 2), c, c) for h, w in resized]
        pipe.feed_input("start", [np.array(win[:2], dtype=np.int32) for win in windows])
        pipe.feed_input("shape", [np.array(win[2:], dtype=np.int32) for win in windows])
        try:
            with _native_stderr_silenced():
                (images,) = pipe.run()
        except RuntimeError as e:
            self._pipe = None  # DALI leaves a pipeline unusable after an error
            for path in paths:
                read_image(path)  # raises the DataError that names the bad file
            raise DataError(f"DALI could not decode a batch starting at {paths[0]}: {str(e).splitlines()[0]}") from None
        out = self._to_torch(images)
        return (out, torch.stack(draws), targets) if self.train else (out, targets)

    def _to_torch(self, images: Any) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(images.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _pipeline(self) -> Any:
        if self._pipe is None:
            self._pipe = _build_pipeline(
                train=self.train,
                img_size=self.img_size,
                batch_size=self.batch_size,
                threads=self.threads,
                device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
            )
        return self._pipe


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Discard what native code writes to file descriptor 2 meanwhile.

    DALI's JPEG decoders log a bad file's error there themselves; the loader raises one :class:`DataError`
    naming the file instead.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _build_pipeline(*, train: bool, img_size: int, batch_size: int, threads: int, device_id: int | None) -> Any:
    dali = require_dali()
    fn, types = dali.fn, dali.types
    decoder = "mixed" if device_id is not None else "cpu"
    # Synchronous: the batch fed is the batch run, which keeps the (seed, epoch) order trivially exact.
    pipe = dali.Pipeline(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_pipelined=False,
        exec_async=False,
    )
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
        if train:
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            images = fn.decoders.image_slice(encoded, start=start, shape=shape, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=img_size, resize_y=img_size, antialias=True)
            images = fn.flip(images, horizontal=flip)
        else:
            resize_x = fn.external_source(name="resize_x", dtype=types.FLOAT, ndim=0)
            resize_y = fn.external_source(name="resize_y", dtype=types.FLOAT, ndim=0)
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=resize_x, resize_y=resize_y, antialias=True)
            images = fn.slice(images, start=start, shape=shape)
        pipe.set_outputs(fn.transpose(images, perm=[2, 0, 1]))
    pipe.build()
    return pipe
