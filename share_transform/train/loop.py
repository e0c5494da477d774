"""One training epoch and one evaluation pass, dataset-agnostic, fast on GPU, exact on CPU.

The loader yields ``(images, targets)`` on the host (uint8 or float), or ``(images, draws, targets)``
when the per-sample augmentation draws travel with the batch; each batch is copied non-blocking to the
device and turned into the model's input there by a ``preprocess`` callable of ``(images[, draws])``
(:class:`Normalize`: uint8 -> float, mean/std; :class:`ColourAugment`: colour jitter and PCA lighting,
then normalisation; the GPU does the arithmetic, the bus carries bytes).
Forward and loss run under bf16 autocast when ``amp`` is on; channels_last on request.

Losses and hit counts stay on the device and are synchronised every ``log_every`` steps only, so the
host keeps queueing work. At each synchronisation the window's losses are checked: a NaN or infinite
loss raises :class:`NonFiniteLossError` naming the first bad step, on every rank at once.

Errors are in percent: top-1 error = 100 - top-1 accuracy. Training figures are running averages over
the epoch in train mode, as fb.resnet.torch reports them.

Example:
    >>> stats = train_one_epoch(model, loader, optimizer, epoch=0, device=dev, preprocess=Normalize(MEAN, STD))
    >>> val = evaluate(model, val_loader, device=dev, preprocess=Normalize(MEAN, STD))
    >>> print(stats.loss, val.top1_err)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence, Sized
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distill import Distillation
from .distributed import all_reduce_sum
from .errors import NonFiniteLossError
from .metrics import ProgressBar

Preprocess = Callable[..., torch.Tensor]

#: ITU-R 601-2 luma, torchvision's (and PIL's) grayscale weights.
_LUMA = (0.2989, 0.587, 0.114)


class Normalize:
    """Device-side input transform: ``(x / scale - mean) / std`` in float32, optionally channels_last.

    Args:
        mean, std: per channel, in the units of ``x / scale``.
        scale: 255 for uint8 images, 1 for float images already in [0, 1].
        channels_last: return an NHWC-strided tensor (faster convs with AMP on tensor cores).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: float = 255.0,
        channels_last: bool = False,
    ) -> None:
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        # Folded into one multiply-add: x * (1 / (scale * std)) - mean / std.
        self.mul = (1.0 / (scale * s)).view(-1, 1, 1)
        self.add = (-m / s).view(-1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mul.device != x.device:
            self.mul, self.add = self.mul.to(x.device), self.add.to(x.device)
        out = torch.addcmul(self.add, x.float(), self.mul)
        if self.channels_last and out.dim() == 4:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class ColourAugment:
    """Device-side colour augmentation of a uint8 batch, then ``normalize``: fb.resnet.torch's jitter and lighting.

    ``__call__(images, draws)`` takes uint8 ``(B, 3, H, W)`` and float ``(B, 9)`` draws (per sample:
    brightness, contrast and saturation factors, the order of the three as a permutation of 0, 1, 2, and
    the three lighting alphas; see :func:`share_transform.train.data.imagenet.colour_draws`). In float32 in
    [0, 1]: each jitter blends with black (brightness), the image's mean grey (contrast) or its grey image
    (saturation) and clamps to [0, 1], as torchvision's tensor ``ColorJitter``; then lighting adds
    ``eigvec @ (alpha * eigval)`` per channel, then ``normalize`` (a :class:`Normalize` with ``scale=1``).

    Example:
        >>> augment = ColourAugment(Normalize(MEAN, STD, scale=1.0), eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC)
        >>> x = augment(images_uint8, draws)
    """

    def __init__(self, normalize: Normalize, *, eigval: Sequence[float], eigvec: Sequence[Sequence[float]]) -> None:
        self.normalize = normalize
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)
        self.luma = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        if self.eigvec.device != images.device:
            self.eigval, self.eigvec, self.luma = (t.to(images.device) for t in (self.eigval, self.eigvec, self.luma))
        x = images.float().div_(255.0)
        factors = draws[:, :3].float().view(-1, 3, 1, 1, 1)
        order = draws[:, 3:6].round().long()
        for position in range(3):
            for op in range(3):
                # Every sample's op at this position; torch.where rather than indexing: no host sync.
                chosen = (order[:, position] == op).view(-1, 1, 1, 1)
                x = torch.where(chosen, self._jitter(op, x, factors[:, op]), x)
        offset = (draws[:, 6:9].float() * self.eigval) @ self.eigvec.T  # (B, 3), in [0, 1] units
        return self.normalize(x + offset.view(-1, 3, 1, 1))

    def _jitter(self, op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        if op == 0:
            return (factor * x).clamp_(0, 1)
        grey = (x * self.luma).sum(dim=1, keepdim=True)
        towards = grey.mean(dim=(1, 2, 3), keepdim=True) if op == 1 else grey
        return (factor * x + (1 - factor) * towards).clamp_(0, 1)


@dataclass(frozen=True)
class EpochStats:
    """Averages of one pass, reduced over ranks; errors in percent."""

    loss: float
    top1_err: float
    top5_err: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def autocast(device: torch.device, amp: bool) -> torch.autocast | nullcontext:
    """bf16 autocast on ``device`` when ``amp`` (bf16 needs no loss scaling, unlike fp16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def _hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-5 hits]`` of a batch (top-k capped at the number of classes)."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    match = top.eq(targets.unsqueeze(-1))
    return torch.stack([match[:, 0].sum(), match.any(dim=-1).sum()]).float()


def _reduce(sums: torch.Tensor, count: int) -> tuple[float, float, float, float]:
    """``(loss sum, top-1 hits, top-5 hits, images)`` summed over ranks (images at least 1)."""
    total = all_reduce_sum(torch.cat([sums, sums.new_tensor([float(count)])])).tolist()
    return total[0], total[1], total[2], max(total[3], 1.0)


def to_device(
    batch: Sequence[torch.Tensor], device: torch.device, preprocess: Preprocess | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, targets)`` on ``device`` from a host batch ``(images, [draws,] targets)``."""
    images, *draws, targets = (t.to(device, non_blocking=True) for t in batch)
    return (preprocess(images, *draws) if preprocess is not None else images), targets


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool,
    distill: Distillation | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a device batch; returns ``(loss, logits)`` detached, without synchronising.

    With ``distill``, the teacher sees the same batch under ``torch.no_grad()`` (and the same autocast) and the loss
    is :func:`share_transform.train.distill.kd_loss`; otherwise cross-entropy. ``scheduler``: a per-step schedule,
    stepped after the optimizer.
    """
    with autocast(images.device, amp):
        logits = model(images)
        if distill is not None:
            with torch.no_grad():
                teacher_logits = distill.teacher(images)
            loss = distill.loss(logits, teacher_logits, targets)
        else:
            loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), logits.detach()


def _first_bad_step(losses: list[torch.Tensor], first_step: int, device: torch.device) -> int | None:
    """Global step of the first non-finite loss in the window on any rank, or None when all are finite."""
    finite = torch.isfinite(torch.stack(losses))
    local = first_step + int(torch.nonzero(~finite)[0, 0]) if not bool(finite.all()) else -1
    if not dist.is_initialized():
        return local if local >= 0 else None
    big = torch.iinfo(torch.int64).max
    t = torch.tensor([local if local >= 0 else big], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item()) if int(t.item()) != big else None


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Sequence[torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    device: torch.device,
    preprocess: Preprocess | None = None,
    amp: bool = False,
    log_every: int = 20,
    start_step: int = 0,
    progress: ProgressBar | None = None,
    distill: Distillation | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> EpochStats:
    """Train ``model`` for one pass over ``loader``.

    Args:
        model: in train mode on return; may be DDP-wrapped and/or compiled.
        loader: host batches ``(images, targets)`` or ``(images, draws, targets)``.
        optimizer: stepped once per batch (the schedule is stepped per epoch by the caller).
        epoch: 0-based, for messages.
        device: where the model lives.
        preprocess: device-side input transform of ``(images[, draws])`` (:class:`Normalize`, :class:`ColourAugment`).
        amp: bf16 autocast.
        log_every: steps between synchronisations (progress update and the NaN check).
        start_step: global step of the first batch (``epoch * len(loader)``), for messages.
        progress: a rank-0 progress bar, updated at each synchronisation.
        distill: learn from a teacher's outputs (:func:`train_step`); the loss reported is the distillation loss.
        scheduler: a per-step lr schedule (``--schedule finetune``), stepped after every optimizer step.

    Raises:
        NonFiniteLossError: a loss was NaN/inf; every rank raises for the same step. Weights are then
            unusable, so the caller must not checkpoint them.
    """
    model.train()
    sums = torch.zeros(3, device=device)  # loss * n, top-1 hits, top-5 hits
    count = 0  # images, known on the host: no per-step copy to the device
    window: list[torch.Tensor] = []
    window_start = start_step
    step = start_step
    t0 = time.perf_counter()

    def sync(step_after: int) -> None:
        nonlocal window, window_start
        if not window:
            return
        bad = _first_bad_step(window, window_start, device)
        if bad is not None:
            of = f"/{len(loader)}" if isinstance(loader, Sized) else ""
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at epoch {epoch + 1}, step {bad - start_step + 1}{of} "
                f"(step {bad + 1} of the run); training stopped",
                epoch=epoch,
                step=bad,
            )
        if progress is not None:
            elapsed = time.perf_counter() - t0
            progress.update(
                step_after - start_step, loss=sums[0].item() / count, img_s=count / elapsed if elapsed else 0.0
            )
        window, window_start = [], step_after

    for i, batch in enumerate(loader):
        step = start_step + i
        images, targets = to_device(batch, device, preprocess)
        loss, logits = train_step(model, images, targets, optimizer, amp=amp, distill=distill, scheduler=scheduler)
        n = targets.shape[0]
        sums += torch.cat([(loss.float() * n).view(1), _hits(logits, targets)])
        count += n
        window.append(loss)
        if len(window) >= log_every:
            sync(step + 1)
    sync(step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    loss_sum, hit1, hit5, total = _reduce(sums, count)
    # Images/s over all ranks: the slowest rank sets the pace, so take the longest wall time.
    wall = torch.tensor([seconds], device=device)
    if dist.is_initialized():
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    return EpochStats(
        loss=loss_sum / total,
        top1_err=100.0 * (1 - hit1 / total),
        top5_err=100.0 * (1 - hit5 / total),
        images=int(total),
        seconds=float(wall.item()),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Sequence[torch.Tensor]],
    *,
    device: torch.device,
    preprocess: Preprocess | None = None,
    amp: bool = False,
) -> EpochStats:
    """Loss and top-1/top-5 error of ``model`` in eval mode over ``loader``, summed over ranks.

    A batch of shape ``(B, K, C, H, W)`` holds K crops per image (ten-crop): the model sees ``B*K``
    images and each image's logits are averaged over its crops before the loss and the ranking.
    Pass the unwrapped model: evaluation needs no gradient synchronisation, and ranks may hold
    different numbers of batches.
    """
    model.eval()
    sums = torch.zeros(3, device=device)
    count = 0
    t0 = time.perf_counter()
    for batch in loader:
        images, targets = to_device(batch, device, preprocess)
        crops = images.shape[1] if images.dim() == 5 else 1
        if crops > 1:
            images = images.flatten(0, 1)
        with autocast(device, amp):
            logits = model(images).float()
        logits = logits.view(targets.shape[0], crops, -1).mean(dim=1)
        n = targets.shape[0]
        loss = F.cross_entropy(logits, targets, reduction="sum")
        sums += torch.cat([loss.view(1), _hits(logits, targets)])
        count += n
    loss_sum, hit1, hit5, total = _reduce(sums, count)
    return EpochStats(
        loss=loss_sum / total,
        top1_err=100.0 * (1 - hit1 / total),
        top5_err=100.0 * (1 - hit5 / total),
        images=int(total),
        seconds=time.perf_counter() - t0,
    )
