"""The optimizer and learning-rate schedule of both recipes: SGD with Nesterov momentum, step decay.

fb.resnet.torch (ImageNet) and wide-residual-networks (CIFAR) both train with SGD, momentum 0.9,
Nesterov, dampening 0, weight decay on every parameter, and a learning rate multiplied by ``gamma`` at
fixed epochs. A shared weight is one ``nn.Parameter`` held by several convs; the optimizer must see it
once, so its momentum and weight decay act once per shared weight (paper eq. 5 sums the gradients).

Example:
    >>> optimizer = build_optimizer(model, lr=scaled_lr(0.1, 256), momentum=0.9, weight_decay=1e-4)
    >>> scheduler = build_scheduler(optimizer, milestones=[30, 60], gamma=0.1)  # step once per epoch
"""

from __future__ import annotations

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


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, milestones: Sequence[int], gamma: float
) -> torch.optim.lr_scheduler.MultiStepLR:
    """``lr x gamma`` after each epoch in ``milestones`` (epochs count from 0; step the scheduler per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
