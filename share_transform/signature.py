"""Layer signatures: what two layers must have in common to share their parameters.

A 2-D conv's signature is its class and every hyper-parameter that shapes its weight or its output
(:class:`ConvSignature`); a linear layer's is its class, weight shape and bias presence
(:class:`LinearSignature`, scope ``"block"`` only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ConvSignature", "LinearSignature"]


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
        t = _base_class(conv)
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
    def bias_numel(self) -> int:
        """Elements of the bias: one per output channel, 0 without a bias."""
        return self.out_channels if self.bias else 0

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


@dataclass(frozen=True)
class LinearSignature:
    """What two ``nn.Linear`` layers must have in common to share their weight and bias: class, weight shape
    and bias presence (docs/design.md, Scopes)."""

    layer_class: str
    in_features: int
    out_features: int
    bias: bool

    #: ``to_dict``'s tag: a plan's signatures without it are convs (files written before linear layers shared).
    KIND = "linear"

    @classmethod
    def of(cls, linear: nn.Linear) -> LinearSignature:
        t = _base_class(linear)
        return cls(
            layer_class=f"{t.__module__}.{t.__qualname__}",
            in_features=linear.in_features,
            out_features=linear.out_features,
            bias=linear.bias is not None,
        )

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def bias_numel(self) -> int:
        return self.out_features if self.bias else 0

    @property
    def is_stride_one(self) -> bool:
        """A linear layer has no stride: it never reduces the resolution."""
        return True

    def describe(self) -> str:
        """The weight shape as the report prints it: ``384x96`` (a 1x1 conv of that shape reads ``384x96x1x1``)."""
        return "x".join(str(s) for s in self.weight_shape)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearSignature:
        d = {k: v for k, v in d.items() if k != "kind"}
        return cls(**d)


#: The signature of a layer that may share: a 2-D conv's or a linear layer's.
Signature: TypeAlias = ConvSignature | LinearSignature


def signature_of(module: nn.Module) -> Signature | None:
    """The signature of a shareable layer (``nn.Conv2d``, ``nn.Linear`` and their subclasses), else None."""
    if isinstance(module, nn.Conv2d):
        return ConvSignature.of(module)
    if isinstance(module, nn.Linear):
        return LinearSignature.of(module)
    return None


def signature_from_dict(d: dict[str, Any]) -> Signature:
    """The signature :meth:`to_dict` wrote; a dict without ``kind`` is a conv's (every plan file before scope
    ``"block"``)."""
    if d.get("kind") == LinearSignature.KIND:
        return LinearSignature.from_dict(d)
    return ConvSignature.from_dict(d)


def _base_class(module: nn.Module) -> type:
    """The module's class; parametrize swaps in a subclass of it, which is still the same layer."""
    t = type(module)
    return t.__bases__[0] if parametrize.is_parametrized(module) else t


def _pair(value: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """A 2-D conv's (height, width) hyper-parameter; raises ValueError unless it holds two numbers."""
    h, w = value
    return (int(h), int(w))
