"""The conv signature: what two spatial convs must have in common to share one weight."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ConvSignature"]


@dataclass(frozen=True)
class ConvSignature:
    """Hyper-parameters of a 2-D conv that must match for its weight to be shared (docs/design.md, The sharing rule)."""

    conv_class: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    bias: bool
    padding_mode: str

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSignature:
        t = type(conv)
        if parametrize.is_parametrized(conv):  # parametrize swaps in a subclass; the conv is still its base
            t = t.__bases__[0]
        padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        return cls(
            conv_class=f"{t.__module__}.{t.__qualname__}",
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=_pair(conv.kernel_size),
            stride=_pair(conv.stride),
            padding=padding,
            dilation=_pair(conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def is_stride_one(self) -> bool:
        return all(s == 1 for s in self.stride)

    def describe(self) -> str:
        """The weight shape as the report prints it, e.g. ``128x128x3x3`` (``/32`` for grouped convs)."""
        text = "x".join(str(s) for s in self.weight_shape)
        return f"{text}/g{self.groups}" if self.groups > 1 else text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvSignature:
        d = dict(d)
        for key in ("kernel_size", "stride", "dilation"):
            d[key] = _pair(d[key])
        if not isinstance(d["padding"], str):
            d["padding"] = _pair(d["padding"])
        return cls(**d)


def _pair(value: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """A 2-D conv's (height, width) hyper-parameter; raises ValueError unless it holds two numbers."""
    h, w = value
    return (int(h), int(w))
