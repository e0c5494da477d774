"""The paper's CIFAR networks and the ShaResNets, for timm.

:func:`register_models` registers ``preact_resnet164``, ``preact_resnet92``, ``wrn_40_4``, ``wrn_28_4``,
``wrn_28_10`` and ``wrn_22_10`` with ``timm.create_model``, and the ShaResNets of :mod:`.sharesnet`
(``sharesnet18`` ... ``sharesnet152``, ``preact_resnet164_share``, ``wrn_40_4_share``, ``wrn_28_10_share``).
``import share_transform`` has it run as soon as timm is imported; ``share_transform.build_model`` and ``load``
call it too. :func:`preact_resnet` and :func:`wide_resnet` build any depth the formulas allow (9n+2 and 6n+4),
and :func:`register_cifar_size` registers any such size by name (``wrn_22_1``, ``preact_resnet29``).
"""

import timm  # noqa: F401  first: timm's import runs register_models, which imports the modules below

# Re-exported (``X as X``): imported from here by name.
from ._cifar import CifarResNet as CifarResNet
from .preact import (
    CIFAR10_MEAN as CIFAR10_MEAN,
    CIFAR10_STD as CIFAR10_STD,
    CIFAR100_MEAN as CIFAR100_MEAN,
    CIFAR100_STD as CIFAR100_STD,
    PreActBottleneck as PreActBottleneck,
    PreActResNet as PreActResNet,
    preact_resnet as preact_resnet,
)
from .registry import register_cifar_size as register_cifar_size, register_models as register_models
from .sharesnet import CIFAR_SHARED as CIFAR_SHARED, SHARESNETS as SHARESNETS
from .wrn import WideBasicBlock as WideBasicBlock, WideResNet as WideResNet, wide_resnet as wide_resnet

#: The names the package exports at its top level (the rest is imported from here by name).
__all__ = ["preact_resnet", "register_cifar_size", "register_models", "wide_resnet"]
