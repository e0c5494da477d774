"""The paper's CIFAR networks, registered with timm.

Importing this package registers ``preact_resnet164``, ``preact_resnet92``, ``wrn_40_4``, ``wrn_28_4``,
``wrn_28_10`` and ``wrn_22_10`` with ``timm.create_model``; :func:`preact_resnet` and :func:`wide_resnet` build
any depth the formulas allow (9n+2 and 6n+4).
"""

from .preact_resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    PreActBottleneck,
    PreActResNet,
    preact_resnet,
)
from .wrn import WideBasicBlock, WideResNet, wide_resnet

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "PreActBottleneck",
    "PreActResNet",
    "WideBasicBlock",
    "WideResNet",
    "preact_resnet",
    "wide_resnet",
]
