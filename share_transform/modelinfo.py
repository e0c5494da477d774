"""What the package needs to know of any model: how it was built, its name, its input size, its distinct conv
weights."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from .errors import InputSizeError, NotAModuleError
from .soft import bank_of, coefficients_of

__all__ = ["build_spec"]

#: Attribute under which :func:`share_transform.build_model` records how it built a model.
BUILD_ATTR = "_share_build"


def build_spec(model: nn.Module) -> dict[str, Any] | None:
    """How :func:`share_transform.build_model` built ``model`` (``{"source", "name", "kwargs"}``), or None for a
    model built elsewhere.

    Example:
        >>> share_transform.build_spec(share_transform.build_model("resnet18", num_classes=10))
        {'source': 'timm', 'name': 'resnet18', 'kwargs': {'num_classes': 10}}
    """
    spec = getattr(model, BUILD_ATTR, None)
    return dict(spec) if spec is not None else None


def model_name(model: nn.Module) -> str:
    """The name errors and reports use: the name ``build_model`` recorded, timm's architecture, else the class."""
    spec = build_spec(model) or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(spec.get("name") or cfg.get("architecture") or type(model).__name__)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The model's own input size (timm ``pretrained_cfg["input_size"]``), else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return check_input_size(size, model_name(model)) if size else (3, 224, 224)


#: Largest input size a plan, a file or an export takes: at most 4096 x 4096 pixels (a 4K frame fits) and 1024
#: channels. Planning costs nothing at any size (meta tensors), but an export runs the model on two batches of
#: this size, and a file's header is input: 3x12000x12000 would make ``export`` allocate gigabytes.
MAX_INPUT_PIXELS = 4096 * 4096
MAX_INPUT_CHANNELS = 1024


def check_input_size(size: Sequence[int], name: str) -> tuple[int, int, int]:
    """``size`` as ``(C, H, W)`` integers, within :data:`MAX_INPUT_PIXELS` and :data:`MAX_INPUT_CHANNELS`.

    >>> check_input_size([3, 32, 32], "wrn_28_10")
    (3, 32, 32)

    Raises:
        InputSizeError: ``size`` does not hold three positive whole numbers, or exceeds the bounds.
    """
    try:
        values = tuple(size)
        whole = len(values) == 3 and all(not isinstance(s, bool) and int(s) == s for s in values)
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or min(int(s) for s in values) < 1:
        raise InputSizeError(f"{name}: input_size must be (C, H, W), three positive integers, got {size!r:.80}")
    c, h, w = (int(s) for s in values)
    if h * w > MAX_INPUT_PIXELS or c > MAX_INPUT_CHANNELS:
        raise InputSizeError(
            f"{name}: input size {c}x{h}x{w} is past the largest share_transform takes: at most "
            f"{MAX_INPUT_PIXELS:,} pixels (4096x4096) and {MAX_INPUT_CHANNELS} channels"
        )
    return (c, h, w)


def check_model(model: object) -> nn.Module:
    """``model`` itself, or the module a ``torch.compile`` wrapper compiles; NotAModuleError for a non-module.

    The wrapper (``OptimizedModule``) names everything ``_orig_mod.``: planning, tying and files work on the
    compiled module, which the wrapper shares, so the compiled model sees every change.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # never imported: nothing is compiled
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return check_model(model._orig_mod)
    if not isinstance(model, nn.Module):
        raise NotAModuleError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself, e.g. "
            'share_transform.apply(timm.create_model("resnet50"))'
        )
    return model


def distinct_conv_weights(model: nn.Module) -> int:
    """Distinct ``nn.Conv2d`` weights of ``model``: a shared weight counts once, a template bank of k as k."""
    return len({key for m in model.modules() if isinstance(m, nn.Conv2d) for key in conv_weight_keys(m)})


def conv_weight_keys(layer: nn.Module) -> set[tuple[int, int]]:
    """Identities of the weights behind a conv or linear ``layer``: its Parameter, or each template of the bank
    it mixes.

    A soft member's ``weight`` is recomputed on every access, so its identity is its bank's.
    """
    bank = bank_of(layer)
    return {(id(bank), i) for i in range(bank.k)} if bank is not None else {(id(layer.weight), 0)}


def weight_storage(layer: nn.Module, *, bias: bool = False) -> dict[int, int]:
    """The tensors that hold a conv or linear ``layer``'s weight, ``{id: numel}``: its Parameter, or its
    coefficients and bank; with ``bias``, its bias Parameter too (when it has one)."""
    bank = bank_of(layer)
    if bank is None:
        weight = cast(torch.Tensor, layer.weight)
        storage = {id(weight): weight.numel()}
    else:
        coefficients = coefficients_of(layer)
        storage = {id(coefficients): coefficients.numel(), id(bank.templates): bank.templates.numel()}
    layer_bias = getattr(layer, "bias", None)
    if bias and isinstance(layer_bias, torch.Tensor):
        storage[id(layer_bias)] = layer_bias.numel()
    return storage
