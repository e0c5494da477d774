"""What the paper's two CIFAR networks have in common: statistics, pretrained_cfg, and the network frame.

Both are pre-activation networks of the authors' Torch7 CIFAR code: a 3x3 stem, three stages of residual
blocks (stride 2 entering stages 2 and 3), a final BN-ReLU (the last block leaves it out), average pooling
and a linear classifier, initialised as docs/design.md, Training protocols, says for CIFAR (fan-in).
:class:`CifarResNet` builds that frame around a block class and gives both networks timm's model API.

The models' modules do not use ``from __future__ import annotations``: torch.fx copies ``forward``'s
annotations into the code it generates, where a string annotation becomes a name TorchScript cannot resolve
(timm's fx -> TorchScript test).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from torch import nn

from ..init import init_weights

# Per-channel statistics of the training sets (RGB, [0, 1] scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """pretrained_cfg of a CIFAR model: 3x32x32 input, CIFAR-10 mean/std, 10 classes, no weights."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "stem",
        "classifier": "fc",
        "paper_ids": "arXiv:1702.08782",
        **kwargs,
    }


class CifarResNet(nn.Module):
    """Stem, three stages of ``blocks_per_stage`` blocks, BN-ReLU, pool, linear.

    Args:
        make_block: ``make_block(in_chs, out_chs, stride)`` builds one residual block.
        widths: Output channels of the three stages.
        blocks_per_stage: Blocks in every stage (n).
        stem_chs: Output channels of the 3x3 stem.
        num_classes: Classifier outputs; 0 for no classifier.
        in_chans: Input channels.
        global_pool: timm pooling type of the head.
        drop_rate: Dropout before the classifier (timm convention; 0 in the paper).
    """

    def __init__(
        self,
        make_block: Callable[[int, int, int], nn.Module],
        widths: Sequence[int],
        blocks_per_stage: int,
        *,
        stem_chs: int,
        num_classes: int,
        in_chans: int,
        global_pool: str,
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.stem = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False)
        self.feature_info = [{"num_chs": stem_chs, "reduction": 1, "module": "stem"}]
        stages = []
        in_chs = stem_chs
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            blocks = [make_block(in_chs, out_chs, stride)]
            blocks += [make_block(out_chs, out_chs, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
            if stage_idx < len(widths) - 1:
                self.feature_info.append(
                    {"num_chs": out_chs, "reduction": 2**stage_idx, "module": f"stages.{stage_idx}"}
                )
        self.stages = nn.Sequential(*stages)
        # Pre-activation nets end with the BN-ReLU the last block left out.
        self.norm = nn.BatchNorm2d(in_chs)
        self.feature_info.append({"num_chs": in_chs, "reduction": 2 ** (len(widths) - 1), "module": "norm"})
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        init_weights(self, "fan_in")

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` outputs (bias 0)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        if isinstance(self.fc, nn.Linear):
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return F.relu(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
