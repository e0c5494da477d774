"""Build a model by name from timm (default) or torchvision, never with pretrained weights.

The CLI, the recipes and ``share_transform.save`` use one builder, so a file can name how to rebuild
its model: ``build_model`` records its arguments on the model (see :func:`build_spec`).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from .errors import ModelArgumentError, ShareError, UnknownModelError

if TYPE_CHECKING:  # torch and timm load only when a model is built, so the CLI's --help stays instant
    from torch import nn

__all__ = ["build_model"]

SOURCES = ("timm", "torchvision")

#: timm's ResNet-family name patterns: what the sweep (``benchmarks/sweep.py``, ``pytest --runslow``) covers.
TIMM_RESNET_FAMILIES = (
    "resnet*",
    "resnetv2*",
    "wide_resnet*",
    "resnext*",
    "seresnet*",
    "seresnext*",
    "ecaresnet*",
    "resnetrs*",
    "skresnet*",
    "gcresnet*",
    "resnetblur*",
    "resnetaa*",
)


def split_name(name: str, source: str | None = None) -> tuple[str, str]:
    """``"torchvision:resnet50"`` -> ``("torchvision", "resnet50")``; a bare name is timm's."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in SOURCES:
        if source is not None and source != prefix:
            raise UnknownModelError(f"{name}: the prefix says {prefix} but source={source!r}")
        return prefix, rest
    source = source or "timm"
    if source not in SOURCES:
        raise UnknownModelError(f"unknown model source {source!r}; choose one of {', '.join(SOURCES)}")
    return source, name


def resnet_family(source: str) -> list[str]:
    """The ResNet-family names of ``source``: timm's :data:`TIMM_RESNET_FAMILIES`, torchvision's ResNet,
    ResNeXt and Wide-ResNet builders."""
    if source == "timm":
        import timm

        return list(timm.list_models(list(TIMM_RESNET_FAMILIES)))
    return [n for n in list_model_names("torchvision") if n.startswith(("resnet", "resnext", "wide_resnet"))]


def list_model_names(source: str) -> list[str]:
    """Names ``build_model`` accepts for ``source`` (timm's include the paper's CIFAR networks)."""
    if source == "timm":
        import timm

        from .models import register_models

        register_models()  # the CIFAR networks and the ShaResNets
        return list(timm.list_models())
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _is_model_name(source: str, arch: str) -> bool:
    """``arch in list_model_names(source)``, without sorting timm's 1,300 names on every build (``load`` builds)."""
    if source == "timm":
        import timm.models

        from .models import register_models

        register_models()
        # list_models' names: registered, untagged, not deprecated
        return "." not in arch and timm.models.is_model(arch) and arch not in timm.models.get_deprecated_models()
    return arch in list_model_names(source)


def build_model(name: str, *, source: str | None = None, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build ``name`` with random weights (``pretrained=False`` always: nothing is downloaded).

    Args:
        name: a timm model name (``"resnet50"``, ``"wrn_28_10"``, any ``"wrn_<d>_<k>"`` or
            ``"preact_resnet<d>"``) or ``"torchvision:resnet50"``.
        source: ``"timm"`` or ``"torchvision"``; a ``source:`` prefix in ``name`` does the same.
        num_classes: classifier size; the model's default when None.
        **kwargs: passed to the constructor (must be JSON-serialisable for ``save`` to record them).

    Raises:
        UnknownModelError: no model of that name, with close matches in the message.
        ModelArgumentError: the constructor does not take ``kwargs``, or a CIFAR network's name has a size its
            formula refuses (``wrn_27_4``: depth off 6n+4).

    Example:
        >>> model = build_model("torchvision:resnet34", num_classes=10)
    """
    from .modelinfo import BUILD_ATTR  # torch: after --help has answered

    source, arch = split_name(name, source)
    if source == "timm":
        from .models import register_cifar_size

        register_cifar_size(arch)  # reduced CIFAR sizes such as wrn_22_1 build by name
    if not _is_model_name(source, arch):
        names = list_model_names(source)
        close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `sharetx models` lists the names"
        raise UnknownModelError(f"unknown {source} model {arch!r}{hint}")
    ctor_kwargs = dict(kwargs)
    if num_classes is not None:
        ctor_kwargs["num_classes"] = num_classes
    try:
        if source == "timm":
            import timm

            model = timm.create_model(arch, pretrained=False, **ctor_kwargs)
        else:
            import torchvision

            model = torchvision.models.get_model(arch, weights=None, **ctor_kwargs)
    except TypeError as exc:  # an argument the constructor does not take
        raise ModelArgumentError(f"{source} model {arch!r} rejected its arguments {ctor_kwargs}: {exc}") from None
    setattr(model, BUILD_ATTR, {"source": source, "name": arch, "kwargs": ctor_kwargs})
    return model


#: The constructor arguments a file or a recipe may give: shape, classes, input channels and dropout rates.
#: Nothing that loads, downloads or places anything (``checkpoint_path``, ``pretrained*``, ``cache_dir``,
#: ``device``): a file's build record is input, and a constructor given such an argument reads other files.
MODEL_KWARGS = frozenset(
    {
        "num_classes", "in_chans",  # every family
        "layers", "channels", "cardinality", "base_width", "stem_width", "stem_type", "block_reduce_first",
        "down_kernel_size", "avg_down", "output_stride", "global_pool",  # timm ResNets
        "groups", "width_per_group", "replace_stride_with_dilation",  # torchvision ResNets
        "depth", "widen_factor",  # the CIFAR networks (wrn_<depth>_<k>, preact_resnet<depth>)
        "depths", "dims",  # timm ConvNeXt
        "drop_rate", "drop_path_rate", "drop_block_rate", "dropout",
    }
)  # fmt: skip

_SCALAR = (bool, int, float, str)


def check_model_kwargs(kwargs: object, *, where: str, error: type[ShareError] = ModelArgumentError) -> dict[str, Any]:
    """``kwargs`` if it is a dict of :data:`MODEL_KWARGS` with plain values (numbers, strings, lists of them).

    Checked before anything is built, by every path that passes arguments it did not write itself to a
    constructor: :func:`share_transform.load` (a file's build record), ``save`` (so that it writes only what
    ``load`` reads back) and the recipes' ``--model-kwargs``.

    Raises:
        ``error`` (``ModelArgumentError`` by default) naming ``where`` and the first argument refused.

    Example:
        >>> check_model_kwargs({"layers": [2, 2, 2, 2]}, where="--model-kwargs")
        {'layers': [2, 2, 2, 2]}
    """
    if not isinstance(kwargs, dict):
        raise error(f"{where}: constructor arguments must be a JSON object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in MODEL_KWARGS:
            raise error(
                f"{where}: constructor argument {key!r} is not accepted; share_transform takes only "
                f"{', '.join(sorted(MODEL_KWARGS))}"
            )
        items = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(v, _SCALAR) for v in items):
            raise error(f"{where}: constructor argument {key}={value!r} must be a number, a string or a list of them")
    return kwargs
