"""share_transform: turn residual networks into ShaResNets.

A ShaResNet (Boulch, "ShaResNet: reducing residual network parameter number by sharing weights",
arXiv 1702.08782) shares one spatial conv weight among the residual blocks of each stage. A torch.fx pass
finds the stages and blocks of any timm or torchvision ResNet / Wide-ResNet / ResNeXt and ties them:

    >>> import timm, share_transform
    >>> model = share_transform.apply(timm.create_model("resnet152"))
    >>> share_transform.count_parameters(model)  # 60,192,808 before
    36821032

Importing the package is cheap: torch, timm and the pass load on first use of a name below (PEP 562), so
``sharetx --help`` answers at once. The paper's CIFAR networks and the ShaResNets register with timm as soon
as timm is imported, before or after this package, so ``timm.create_model("sharesnet50")`` works after
``import share_transform``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._timm_hook import after_import

__version__ = "0.1.0"

#: Public name -> the submodule that defines it ("" for a submodule itself).
_EXPORTS: dict[str, str] = {
    "models": "",
    "paper": "",
    "apply": "apply",
    "count_parameters": "apply",
    "get_plan": "apply",
    "get_reconstruction": "apply",
    "is_tied": "apply",
    "retie": "apply",
    "untie": "apply",
    "build_model": "build",
    "build_spec": "build",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ExportError": "errors",
    "FileFormatError": "errors",
    "InputSizeError": "errors",
    "MetaTensorError": "errors",
    "MissingFileError": "errors",
    "ModelArgumentError": "errors",
    "NoSpatialConvError": "errors",
    "NonFiniteLossError": "errors",
    "NotAModuleError": "errors",
    "OutputExistsError": "errors",
    "OutputLockedError": "errors",
    "PlanMismatchError": "errors",
    "ReportError": "errors",
    "ShareError": "errors",
    "ShareOptionError": "errors",
    "TraceError": "errors",
    "UnknownInitError": "errors",
    "UnknownModelError": "errors",
    "UnknownPolicyError": "errors",
    "WarmStartError": "errors",
    "OnnxExport": "export",
    "export_onnx": "export",
    "FileInfo": "io",
    "load": "io",
    "load_checkpoint": "io",
    "read_checkpoint": "io",
    "read_info": "io",
    "save": "io",
    "preact_resnet": "models",
    "wide_resnet": "models",
    "POLICIES": "policies",
    "ShareGroup": "plan",
    "SharePlan": "plan",
    "SpatialConv": "plan",
    "StagePlan": "plan",
    "plan": "plan",
    "sweep": "plan",
    "ConvSignature": "signature",
    "ShareSummary": "summary",
    "summarize": "summary",
    "Reconstruction": "warmstart",
    "recalibrate_bn": "warmstart",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names as type checkers and IDEs see them; `X as X` marks a re-export
    from . import (
        models as models,
        paper as paper,
    )
    from .apply import (
        apply as apply,
        count_parameters as count_parameters,
        get_plan as get_plan,
        get_reconstruction as get_reconstruction,
        is_tied as is_tied,
        retie as retie,
        untie as untie,
    )
    from .build import (
        build_model as build_model,
        build_spec as build_spec,
    )
    from .errors import (
        CheckpointError as CheckpointError,
        ConfigError as ConfigError,
        DataError as DataError,
        ExportError as ExportError,
        FileFormatError as FileFormatError,
        InputSizeError as InputSizeError,
        MetaTensorError as MetaTensorError,
        MissingFileError as MissingFileError,
        ModelArgumentError as ModelArgumentError,
        NonFiniteLossError as NonFiniteLossError,
        NoSpatialConvError as NoSpatialConvError,
        NotAModuleError as NotAModuleError,
        OutputExistsError as OutputExistsError,
        OutputLockedError as OutputLockedError,
        PlanMismatchError as PlanMismatchError,
        ReportError as ReportError,
        ShareError as ShareError,
        ShareOptionError as ShareOptionError,
        TraceError as TraceError,
        UnknownInitError as UnknownInitError,
        UnknownModelError as UnknownModelError,
        UnknownPolicyError as UnknownPolicyError,
        WarmStartError as WarmStartError,
    )
    from .export import (
        OnnxExport as OnnxExport,
        export_onnx as export_onnx,
    )
    from .io import (
        FileInfo as FileInfo,
        load as load,
        load_checkpoint as load_checkpoint,
        read_checkpoint as read_checkpoint,
        read_info as read_info,
        save as save,
    )
    from .models import (
        preact_resnet as preact_resnet,
        wide_resnet as wide_resnet,
    )
    from .plan import (
        ShareGroup as ShareGroup,
        SharePlan as SharePlan,
        SpatialConv as SpatialConv,
        StagePlan as StagePlan,
        plan as plan,
        sweep as sweep,
    )
    from .policies import POLICIES as POLICIES
    from .signature import (
        ConvSignature as ConvSignature,
    )
    from .summary import (
        ShareSummary as ShareSummary,
        summarize as summarize,
    )
    from .warmstart import (
        Reconstruction as Reconstruction,
        recalibrate_bn as recalibrate_bn,
    )


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = importlib.import_module(f".{module or name}", __name__)
    if module:
        value = getattr(value, name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it as an attribute of the package. ``apply`` and ``plan`` name both a
        # submodule and the function users call: the function must win, as it did with eager imports.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _register_timm_models() -> None:
    importlib.import_module(".models", __name__)  # registers the CIFAR networks and the ShaResNets


after_import("timm", _register_timm_models)
