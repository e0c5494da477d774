"""The paper's CIFAR networks and the ShaResNets, registered with timm.

Importing this package registers ``preact_resnet164``, ``preact_resnet92``, ``wrn_40_4``, ``wrn_28_4``,
``wrn_28_10`` and ``wrn_22_10`` with ``timm.create_model``, and the ShaResNets of :mod:`.sharesnet`
(``sharesnet18`` ... ``sharesnet152``, ``preact_resnet164_share``, ``wrn_40_4_share``, ``wrn_28_10_share``);
:func:`preact_resnet` and :func:`wide_resnet` build any depth the formulas allow (9n+2 and 6n+4), and
:func:`register_cifar_size` registers any such size by name (``wrn_22_1``, ``preact_resnet29``):
``share_transform.build_model`` and ``load`` call it on demand.
"""

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import timm
from timm.models import register_model

from ..errors import UnknownModelError
from ._cifar import CifarResNet
from .preact import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    PreActBottleneck,
    PreActResNet,
    preact_resnet,
)
from .sharesnet import CIFAR_SHARED, SHARESNETS
from .wrn import WideBasicBlock, WideResNet, wide_resnet

_CIFAR_NAME = re.compile(r"wrn_(\d+)_(\d+)|preact_resnet(\d+)")


def register_cifar_size(name: str) -> bool:
    """Register ``wrn_<depth>_<k>`` (depth 6n+4) or ``preact_resnet<depth>`` (9n+2) with timm, if not yet known.

    Returns True when ``name`` is such a network (registered now or before), False for any other name.

    Raises:
        UnknownModelError: the name has the pattern but a depth the formula does not allow.
    """
    m = _CIFAR_NAME.fullmatch(name)
    if m is None:
        return False
    if timm.is_model(name):
        return True
    build: Callable[..., CifarResNet]
    if m[1]:
        depth, widen_factor = int(m[1]), int(m[2])
        if depth < 10 or (depth - 4) % 6 or widen_factor < 1:
            raise UnknownModelError(f"{name}: a WRN-d-k needs depth 6n+4 (10, 16, 22, 28, 40, ...) and k >= 1")
        build = partial(wide_resnet, depth, widen_factor)
    else:
        depth = int(m[3])
        if depth < 11 or (depth - 2) % 9:
            raise UnknownModelError(f"{name}: a pre-act ResNet needs depth 9n+2 (11, 20, 29, ..., 92, ..., 164)")
        build = partial(preact_resnet, depth)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> Any:
        return build(pretrained=pretrained, **kwargs)

    entrypoint.__name__ = name
    register_model(entrypoint)
    return True


__all__ = [
    "CIFAR_SHARED",
    "SHARESNETS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "PreActBottleneck",
    "PreActResNet",
    "WideBasicBlock",
    "WideResNet",
    "preact_resnet",
    "register_cifar_size",
    "wide_resnet",
]
