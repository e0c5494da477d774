"""Weight initialisation of the paper's two code bases, applied before sharing.

* ImageNet, fb.resnet.torch (``models/init.lua``): conv weight ~ N(0, sqrt(2 / (k*k*out_channels)))
  ("fan_out", He et al. 2015), no conv bias; BatchNorm weight 1, bias 0; linear bias 0 (the linear
  weight keeps the default U(-1/sqrt(in), 1/sqrt(in)), as Torch7's).
* CIFAR, wide-residual-networks: the same with fan_in, N(0, sqrt(2 / (k*k*in_channels))).

The CIFAR networks (:mod:`share_transform.models`) initialise themselves with "fan_in" when built; the
recipes (:mod:`share_transform.train`) re-initialise any model with their ``--init``. Initialise the
unshared model, then ``share_transform.apply(model, init="first")``: each shared weight keeps its first
member's draw, so it has the distribution of any other conv.

Paper: `Delving Deep into Rectifiers` (He et al. 2015) - https://arxiv.org/abs/1502.01852

Example:
    >>> init_weights(model, mode="fan_out")
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UnknownInitError

__all__ = ["MODES", "init_weights"]

MODES = ("fan_out", "fan_in")


@torch.no_grad()
def init_weights(model: nn.Module, mode: str = "fan_out") -> nn.Module:
    """Re-initialise every conv, BatchNorm and linear layer of ``model`` in place and return it.

    Overrides library defaults such as timm's zero-initialised last BatchNorm of each block, which the
    paper's recipes did not use.

    Raises:
        UnknownInitError: ``mode`` is not one of :data:`MODES` (a ``ValueError`` too).
    """
    if mode not in MODES:
        raise UnknownInitError(f"unknown init mode {mode!r}; choose one of {', '.join(MODES)}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            fan = k * (m.out_channels if mode == "fan_out" else m.in_channels // m.groups)
            m.weight.normal_(0.0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        elif isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()
    return model
