"""What the package needs to know of any model: its name, its input size, its distinct conv weights."""

from __future__ import annotations

from torch import nn

from .build import build_spec
from .errors import NotAModuleError

__all__ = ["check_model", "default_input_size", "distinct_conv_weights", "model_name"]


def model_name(model: nn.Module) -> str:
    """The name errors and reports use: the name ``build_model`` recorded, timm's architecture, else the class."""
    spec = build_spec(model) or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(spec.get("name") or cfg.get("architecture") or type(model).__name__)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's own input size (timm ``pretrained_cfg["input_size"]``), else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return tuple(int(s) for s in size) if size else (3, 224, 224)


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise NotAModuleError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself, e.g. "
            'share_transform.apply(timm.create_model("resnet50"))'
        )
    return model


def distinct_conv_weights(model: nn.Module) -> int:
    """Distinct ``nn.Conv2d`` weights of ``model``: a shared weight counts once."""
    return len({id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)})
