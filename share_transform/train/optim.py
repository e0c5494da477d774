"""The optimizer and learning-rate schedules of both recipes: SGD with Nesterov momentum; step decay, or a
warm-up and cosine for fine-tuning.

fb.resnet.torch (ImageNet) and wide-residual-networks (CIFAR) both train with SGD, momentum 0.9,
Nesterov, dampening 0, weight decay on every parameter, and a learning rate multiplied by ``gamma`` at
fixed epochs. A shared weight is one ``nn.Parameter`` held by several convs; the optimizer must see it
once, so its momentum and weight decay act once per shared weight (paper eq. 5 sums the gradients).

``--schedule finetune`` (a warm start: :data:`share_transform.train.args.FINETUNE`) instead warms the lr up
linearly and then decays it along a half cosine, updated every step (:class:`WarmupCosine`).

Example:
    >>> optimizer = build_optimizer(model, lr=scaled_lr(0.1, 256), momentum=0.9, weight_decay=1e-4)
    >>> scheduler = build_scheduler(optimizer, milestones=[30, 60], gamma=0.1)  # step once per epoch
    >>> cosine = build_scheduler(optimizer, schedule="finetune", total_steps=2000, warmup_steps=100)  # per step
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..soft import soft_coefficients


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of ``model``, each shared weight once, in module order."""
    seen: set[int] = set()
    out = []
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def scaled_lr(lr_per_reference: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling (Goyal et al. 2017): ``lr`` is quoted per ``reference_batch`` images."""
    return lr_per_reference * global_batch / reference_batch


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = True
) -> torch.optim.SGD:
    """SGD over :func:`unique_parameters`, weight decay on all of them (BN and biases included, as the paper).

    Soft-sharing coefficients form a second param group without weight decay, as the soft-sharing reference
    code trains them (decaying them would pull every member's weight towards zero).
    """
    coefficients = {id(c) for c in soft_coefficients(model)}
    params = unique_parameters(model)
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in coefficients]}]
    if coefficients:
        groups.append({"params": [p for p in params if id(p) in coefficients], "weight_decay": 0.0})
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=momentum,
        dampening=0.0,
        weight_decay=weight_decay,
        nesterov=nesterov and momentum > 0,
    )


class WarmupCosine:
    """The lr factor of step ``s`` (0-based) for :class:`torch.optim.lr_scheduler.LambdaLR`: ``(s + 1) / W`` over
    the first ``W = warmup_steps`` steps (so the first step already moves), then ``(1 + cos(pi * p)) / 2`` with
    ``p = (s - W) / (total_steps - W)`` the fraction of the decay done: 1 at its first step, 0 after the last.

    A plain object (not a lambda), so the scheduler's ``state_dict`` holds its two integers and a checkpoint
    read with ``torch.load(weights_only=True)`` restores it.
    """

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup_steps, decay) / decay))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str = "step",
    milestones: Sequence[int] = (),
    gamma: float | None = None,
    total_steps: int = 0,
    warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The lr schedule: ``"step"``, ``lr x gamma`` after each epoch in ``milestones`` (epochs count from 0; step the
    scheduler once per epoch); ``"finetune"``, :class:`WarmupCosine` over ``total_steps`` (step it after every
    optimizer step). :func:`per_step` says which.
    """
    if schedule == "finetune":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma or 1.0)


def per_step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    """True for a schedule stepped after every optimizer step (:class:`WarmupCosine`), False for one stepped per
    epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
