"""ShaResNets by name in timm: ``sharesnet18/34/50/101/152`` and the paper's CIFAR networks as ``*_share``.

Each entry point builds the plain network with its own timm entry point (``resnet50``, ``wrn_40_4``...), under
the ShaResNet's name and ``pretrained_cfg`` (no weights exist: no url, no hub id), then ties it with
:func:`share_transform.apply`: policy ``imagenet`` for the ImageNet ResNets (the authors' ImageNet code,
Table 1's ImageNet rows), policy ``cifar`` for the CIFAR networks (the authors' CIFAR code). Every keyword
of the plain entry point works (``num_classes``, ``layers``, ``features_only``, ``output_stride``...), so
``timm.create_model("sharesnet50", num_classes=10)``, ``timm.list_models("sharesnet*")`` and timm's own
``train.py --model sharesnet50`` work once :func:`share_transform.models.register_models` registered them
(``import share_transform`` arranges that for timm's import).

Example:
    >>> import timm, share_transform
    >>> model = timm.create_model("sharesnet152")
    >>> share_transform.count_parameters(model)  # resnet152: 60,192,808
    36821032
"""

from collections.abc import Callable
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, get_pretrained_cfg, model_entrypoint
from torch import nn

from ..modelinfo import default_input_size
from ..tie import PLAIN_ATTR, apply
from ._cifar import cifar_cfg

__all__ = ["CIFAR_SHARED", "ENTRYPOINTS", "SHARESNETS", "imagenet_cfg"]

#: ShaResNet name -> the timm ResNet it shares.
SHARESNETS = {f"sharesnet{d}": f"resnet{d}" for d in (18, 34, 50, 101, 152)}
#: Shared CIFAR network name -> the plain network (the paper's Table 1 CIFAR rows).
CIFAR_SHARED = {f"{name}_share": name for name in ("preact_resnet164", "wrn_40_4", "wrn_28_10")}


def imagenet_cfg(**kwargs: Any) -> dict[str, Any]:
    """pretrained_cfg of a ShaResNet: 3x224x224 input, ImageNet mean/std, 1000 classes, no weights.

    The crop is fb.resnet.torch's 224 of 256 (0.875), the protocol the paper trained with.
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:1702.08782",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {**{name: imagenet_cfg() for name in SHARESNETS}, **{name: cifar_cfg() for name in CIFAR_SHARED}}
)


def _entrypoint(name: str, plain: str, policy: str) -> Callable[..., nn.Module]:
    """timm entry point of ``name``: the plain network under ``name``'s pretrained_cfg, tied with ``policy``."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if kwargs.get("pretrained_cfg") is None:
            kwargs["pretrained_cfg"] = get_pretrained_cfg(name)
        model = model_entrypoint(plain)(pretrained=pretrained, **kwargs)
        # A features_only wrapper is tied too: it holds the same modules, and gets the state-dict hooks itself.
        size = default_input_size(model)
        setattr(model, PLAIN_ATTR, plain)  # untie names the model for what it becomes
        return apply(model, policy, input_size=(kwargs.get("in_chans", size[0]), size[1], size[2]))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (
        f"{name}: timm's {plain} with the spatial convs of each stage sharing one weight (policy {policy})."
    )
    return entrypoint


#: timm entry points, registered by :func:`share_transform.models.register_models`.
ENTRYPOINTS = tuple(
    [_entrypoint(name, plain, "imagenet") for name, plain in SHARESNETS.items()]
    + [_entrypoint(name, plain, "cifar") for name, plain in CIFAR_SHARED.items()]
)
