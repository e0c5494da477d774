"""Registration with timm, as one function that registers once (and one for the reduced CIFAR sizes).

``import share_transform`` has :func:`register_models` called right after timm's own import. That import may be
the first line of ``share_transform.models`` (which imports timm before its own modules for this reason), so this
module imports the networks only inside its functions.
"""

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import timm
from timm.models import register_model
from torch import nn

__all__ = ["register_cifar_size", "register_models"]

_registered = False


def register_models() -> None:
    """Register the paper's CIFAR networks and the ShaResNets with timm; later calls do nothing."""
    global _registered
    if _registered:
        return
    from . import preact, sharesnet, wrn  # sharesnet ties with the pass: imported when registering

    for entrypoint in (*wrn.ENTRYPOINTS, *preact.ENTRYPOINTS, *sharesnet.ENTRYPOINTS):
        register_model(entrypoint)
    _registered = True


_CIFAR_NAME = re.compile(r"wrn_(\d+)_(\d+)|preact_resnet(\d+)")


def register_cifar_size(name: str) -> bool:
    """Register ``wrn_<depth>_<k>`` (depth 6n+4) or ``preact_resnet<depth>`` (9n+2) with timm, if not yet known.

    Returns True when ``name`` is such a network (registered now or before), False for any other name.

    Raises:
        ModelArgumentError: the name has the pattern but a size its formula refuses (``wrn_27_4``): the same
            error, from the same check, as ``wide_resnet(27, 4)``.
    """
    m = _CIFAR_NAME.fullmatch(name)
    if m is None:
        return False
    register_models()
    if timm.is_model(name):
        return True
    from .preact import check_preact_depth, preact_resnet
    from .wrn import check_wrn_size, wide_resnet

    # The size is checked before anything is registered, so a refused name leaves timm's registry as it was.
    build: Callable[..., nn.Module]
    if m[1]:
        depth, widen_factor = int(m[1]), int(m[2])
        check_wrn_size(depth, widen_factor)
        build = partial(wide_resnet, depth, widen_factor)
    else:
        depth = int(m[3])
        check_preact_depth(depth)
        build = partial(preact_resnet, depth)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> Any:
        return build(pretrained=pretrained, **kwargs)

    entrypoint.__name__ = name
    register_model(entrypoint)
    return True
