"""Pre-activation bottleneck ResNet for CIFAR (ResNet-164, ResNet-92, any 9n+2).

The CIFAR ResNets of the ShaResNet paper (Table 1 ResNet-164, Table 3 ResNet-92), built as the authors'
Torch7 code built them (wide-residual-networks' ``resnet-pre-act``): a 3x3 stem to 16 channels, three stages
of ``n = (depth - 2) / 9`` pre-activation bottleneck blocks with 64/128/256 outputs (bottleneck width out/4),
the stride on the first 1x1 conv of the first block of stages 2 and 3, a 1x1 projection shortcut in the first
block of every stage, and a final BN-ReLU-avgpool-linear head. Init follows the CIFAR code: conv weights
N(0, sqrt(2 / (k*k*in_channels))), no conv bias, BN weight 1 and bias 0, linear bias 0.

The frame, init and timm API shared with :mod:`share_transform.models.wrn` are in
:class:`share_transform.models._cifar.CifarResNet`.

Papers:
* `ShaResNet: reducing residual network parameter number by sharing weights` - https://arxiv.org/abs/1702.08782
* `Identity Mappings in Deep Residual Networks` - https://arxiv.org/abs/1603.05027
* `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
"""

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn

from ..errors import ModelArgumentError
from ._cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CifarResNet, cifar_cfg

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "PreActBottleneck",
    "PreActResNet",
    "check_preact_depth",
    "cifar_cfg",
    "preact_resnet",
]


def check_preact_depth(depth: int) -> None:
    """The one check of a pre-activation ResNet's depth, whether given as an argument or in the name
    ``preact_resnet<d>``.

    Raises:
        ModelArgumentError: ``depth`` is not 9n+2 with n >= 1.
    """
    if depth < 11 or (depth - 2) % 9:
        raise ModelArgumentError(
            f"preact_resnet{depth}: a pre-act ResNet needs depth 9n+2 with n >= 1 (11, 20, ..., 92, ..., 164), "
            f"got {depth}"
        )


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1, added to the shortcut.

    The 3x3 (``conv2``) is the block's spatial conv, the one ShaResNet shares across a stage. With a
    projection shortcut (first block of a stage) the first BN-ReLU is applied once and feeds both branches.
    """

    expansion = 4

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        mid_chs = out_chs // self.expansion
        self.bn1 = nn.BatchNorm2d(in_chs)
        # The stride sits on the first 1x1, as in the authors' CIFAR code, so the 3x3 always runs at stride 1.
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, stride=stride, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(CifarResNet):
    """Pre-activation bottleneck ResNet-(9n+2) for 32x32 inputs.

    Args:
        depth: Nominal depth, 9n+2 with n >= 1 blocks per stage (164 -> 18, 92 -> 10).
        num_classes: Classifier outputs; 0 for no classifier.
        in_chans: Input channels.
        base_width: Stem width and bottleneck width of stage 1; stage outputs are 4x, 8x, 16x it (16 -> 64/128/256).
        global_pool: timm pooling type of the head.
        drop_rate: Dropout before the classifier (timm convention; 0 in the paper).
    """

    def __init__(
        self,
        depth: int = 164,
        num_classes: int = 10,
        in_chans: int = 3,
        base_width: int = 16,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        check_preact_depth(depth)
        super().__init__(
            PreActBottleneck,
            [base_width * PreActBottleneck.expansion * 2**s for s in range(3)],
            (depth - 2) // 9,
            stem_chs=base_width,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
        )
        self.depth = depth


def preact_resnet(depth: int, num_classes: int = 10, pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Build a pre-activation bottleneck ResNet-``depth`` for CIFAR through timm's builder.

    ``depth`` must be 9n+2 (n >= 1); ``ModelArgumentError`` otherwise. No pretrained weights exist. Extra keyword
    arguments go to :class:`PreActResNet` (``in_chans``, ``base_width``, ``global_pool``, ``drop_rate``) or to
    ``timm.models.build_model_with_cfg``.

    Example::

        model = preact_resnet(164)                  # same as timm.create_model("preact_resnet164")
        model = preact_resnet(56, num_classes=100)  # any 9n+2 depth
    """
    if kwargs.get("pretrained_cfg") is None:
        kwargs["pretrained_cfg"] = cifar_cfg()
    return build_model_with_cfg(
        PreActResNet,
        f"preact_resnet{depth}",
        pretrained,
        depth=depth,
        num_classes=num_classes,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2, 3)},
        **kwargs,
    )


default_cfgs = generate_default_cfgs({"preact_resnet164": cifar_cfg(), "preact_resnet92": cifar_cfg()})


def preact_resnet164(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-act ResNet-164 (18 bottlenecks per stage), the paper's Table 1 CIFAR-10 ResNet."""
    return preact_resnet(164, pretrained=pretrained, **kwargs)


def preact_resnet92(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-act ResNet-92 (10 bottlenecks per stage), Table 3's equal-size baseline for ShaResNet-164."""
    return preact_resnet(92, pretrained=pretrained, **kwargs)


#: timm entry points, registered by :func:`share_transform.models.register_models`.
ENTRYPOINTS = (preact_resnet164, preact_resnet92)
