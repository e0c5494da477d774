"""Wide ResNet WRN-d-k for CIFAR (WRN-40-4, WRN-28-10, WRN-28-4, WRN-22-10, any 6n+4).

The Wide ResNets of the ShaResNet paper (Table 1 WRN-40-4 and WRN-28-10, Table 3 WRN-28-4 and WRN-22-10),
built as the wide-residual-networks Torch7 code the paper used: a 3x3 stem to 16 channels, three stages of
``n = (depth - 4) / 6`` pre-activation wide basic blocks of width 16k/32k/64k (stride 2 on the first 3x3 of
stages 2 and 3), optional dropout between the two 3x3 convs, a 1x1 projection shortcut where the block changes
shape, and a final BN-ReLU-avgpool-linear head. Init as the CIFAR code:
:func:`share_transform.init.init_weights` with ``"fan_in"``.

Papers:
* `ShaResNet: reducing residual network parameter number by sharing weights` - https://arxiv.org/abs/1702.08782
* `Wide Residual Networks` - https://arxiv.org/abs/1605.07146
"""

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn

from ..errors import ModelArgumentError
from ._cifar import CifarResNet, cifar_cfg

__all__ = ["WideBasicBlock", "WideResNet", "check_wrn_size", "wide_resnet"]


def check_wrn_size(depth: int, widen_factor: int) -> None:
    """The one check of a WRN-d-k's size, whether given as arguments or in the name ``wrn_<d>_<k>``.

    Raises:
        ModelArgumentError: ``depth`` is not 6n+4 with n >= 1, or ``widen_factor`` is below 1.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ModelArgumentError(
            f"wrn_{depth}_{widen_factor}: a WRN needs depth 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
        )
    if widen_factor < 1:
        raise ModelArgumentError(
            f"wrn_{depth}_{widen_factor}: a WRN needs widen_factor k >= 1 (a positive integer), got {widen_factor}"
        )


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-3x3, BN-ReLU-[dropout]-3x3, added to the shortcut.

    The second 3x3 (``conv2``) is the block's spatial conv, the one ShaResNet shares across a stage. With a
    projection shortcut the first BN-ReLU is applied once and feeds both branches.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        # No module at all when dropout is off, so an unshared model is exactly the paper's CIFAR-10 net.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(CifarResNet):
    """Wide ResNet WRN-``depth``-``widen_factor`` for 32x32 inputs.

    Args:
        depth: Nominal depth, 6n+4 with n >= 1 blocks per stage (28 -> 4, 40 -> 6).
        widen_factor: k; stage widths are 16k, 32k, 64k.
        num_classes: Classifier outputs; 0 for no classifier.
        in_chans: Input channels.
        dropout: Dropout between the two 3x3 convs of every block (0.3 in the paper's CIFAR-100 run).
        global_pool: timm pooling type of the head.
        drop_rate: Dropout before the classifier (timm convention; 0 in the paper).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        dropout: float = 0.0,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        check_wrn_size(depth, widen_factor)
        if not 0.0 <= dropout < 1.0:
            raise ModelArgumentError(f"WRN dropout must be in [0, 1), got {dropout}")
        super().__init__(
            partial(WideBasicBlock, dropout=dropout),
            [16 * widen_factor * 2**s for s in range(3)],
            (depth - 4) // 6,
            stem_chs=16,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
        )
        self.depth = depth
        self.widen_factor = widen_factor


def wide_resnet(
    depth: int,
    widen_factor: int,
    num_classes: int = 10,
    dropout: float = 0.0,
    pretrained: bool = False,
    **kwargs: Any,
) -> WideResNet:
    """Build WRN-``depth``-``widen_factor`` for CIFAR through timm's builder.

    ``depth`` must be 6n+4 (n >= 1) and ``widen_factor`` >= 1; ``ModelArgumentError`` otherwise. ``dropout`` is applied
    between the two convs of every block only when > 0 (the paper used 0.3 for CIFAR-100). No pretrained
    weights exist. Extra keyword arguments go to :class:`WideResNet` or ``timm.models.build_model_with_cfg``.

    Example::

        model = wide_resnet(28, 10, num_classes=100, dropout=0.3)  # timm.create_model("wrn_28_10", ...)
        model = wide_resnet(16, 8)                                 # any 6n+4 depth, any k
    """
    if kwargs.get("pretrained_cfg") is None:
        kwargs["pretrained_cfg"] = cifar_cfg()
    return build_model_with_cfg(
        WideResNet,
        f"wrn_{depth}_{widen_factor}",
        pretrained,
        depth=depth,
        widen_factor=widen_factor,
        num_classes=num_classes,
        dropout=dropout,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2, 3)},
        **kwargs,
    )


default_cfgs = generate_default_cfgs({name: cifar_cfg() for name in ("wrn_40_4", "wrn_28_4", "wrn_28_10", "wrn_22_10")})


def wrn_40_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-4, the paper's Table 1 CIFAR-10 Wide ResNet."""
    return wide_resnet(40, 4, pretrained=pretrained, **kwargs)


def wrn_28_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-4, Table 3's equal-size baseline for ShaResNet WRN-40-4."""
    return wide_resnet(28, 4, pretrained=pretrained, **kwargs)


def wrn_28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10, the paper's Table 1 CIFAR-100 Wide ResNet (trained with ``dropout=0.3``)."""
    return wide_resnet(28, 10, pretrained=pretrained, **kwargs)


def wrn_22_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-22-10, Table 3's equal-size baseline for ShaResNet WRN-28-10."""
    return wide_resnet(22, 10, pretrained=pretrained, **kwargs)


#: timm entry points, registered by :func:`share_transform.models.register_models`.
ENTRYPOINTS = (wrn_40_4, wrn_28_4, wrn_28_10, wrn_22_10)
