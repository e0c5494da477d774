"""Exceptions raised by share_transform's core (the training stack's own are in :mod:`share_transform.train.errors`).

Every error the package raises on bad input derives from :class:`ShareError`, so callers (and the ``sharetx``
CLI) can catch one class, and from the built-in exception a Python user would expect (``TypeError`` for a wrong
argument type, ``ValueError`` for a bad value). They come in groups: :class:`PlanError` for what stops a model
from being planned or tied, :class:`FileError` for files read and written, and the training stack's
``TrainingError``; a few (a model that cannot be built, a missing extra) stand alone. One rule, one class.
"""

from __future__ import annotations

import os

__all__ = [
    "CheckpointError",
    "DeviceError",
    "ExportError",
    "FileError",
    "FileFormatError",
    "InputSizeError",
    "MetaTensorError",
    "MissingExtraError",
    "MissingFileError",
    "ModelArgumentError",
    "NoSpatialConvError",
    "NotAModuleError",
    "OutputExistsError",
    "PlanError",
    "PlanMismatchError",
    "RegistrationError",
    "ShareError",
    "ShareOptionError",
    "TraceError",
    "UnknownInitError",
    "UnknownModelError",
    "UnknownPolicyError",
    "WarmStartError",
]


#: The environment variable that asks ``sharetx`` and the recipes for the full traceback of an error.
DEBUG_ENV = "SHARETX_DEBUG"


def debug_requested() -> bool:
    """Whether the environment asks for tracebacks: ``SHARETX_DEBUG`` set to anything but empty or ``0``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class ShareError(Exception):
    """Base class of every error share_transform raises on bad input."""


# -- building a model -------------------------------------------------------------------------------------------


class NotAModuleError(ShareError, TypeError):
    """The argument is not a ``torch.nn.Module``."""


class UnknownModelError(ShareError, ValueError):
    """No timm or torchvision model has this name (or the name's ``source:`` prefix is not a model library)."""


class ModelArgumentError(ShareError, TypeError, ValueError):
    """The model's constructor does not take the arguments given, or not their values: a WRN depth off 6n+4,
    whether given to ``wide_resnet(27, 4)`` or in the name ``wrn_27_4``."""


class MissingExtraError(ShareError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class DeviceError(ShareError, RuntimeError):
    """The device asked for is not on this machine (no GPU, an index past the last one) or is not a device name."""


# -- planning and tying -----------------------------------------------------------------------------------------


class PlanError(ShareError):
    """Base of the errors that stop a model from being planned or tied."""


class UnknownPolicyError(PlanError, ValueError):
    """The sharing policy is not one of the registered policies."""


class ShareOptionError(PlanError, ValueError):
    """A sharing option (group size, scope, templates, budget, allocate) is out of range, conflicts with another,
    or cannot be met."""


class WarmStartError(ShareOptionError):
    """A warm start that cannot be made: ``init`` does not fit the groups (``"svd"`` for hard groups, ``"mean"`` for
    soft ones), or ``"mean-scaled"`` finds no BatchNorm to fold a member's scales into."""


class UnknownInitError(PlanError, ValueError):
    """The init mode of a shared weight is not one of the known modes."""


class RegistrationError(PlanError, TypeError, ValueError):
    """An extension point refuses a registration: a policy name or a layer class that has an entry already
    (without ``replace=True``), or an entry that is not what the registry holds."""


class TraceError(PlanError):
    """torch.fx could not trace the model, or shape propagation failed inside the pass: a shape rule raised, or
    fake tensors cannot run a layer (the message names the graph node)."""


class InputSizeError(PlanError, ValueError):
    """The input size is malformed, too small to tell the stages apart, or the model's own code (or a torch
    kernel on its path) rejected it during shape propagation (the message names the graph node)."""


class NoSpatialConvError(PlanError):
    """The model has no residual block with a layer the scope shares: there is nothing to share."""


class PlanMismatchError(PlanError, ValueError):
    """A plan does not fit the model it is applied to, the model is tied otherwise than the plan says (or
    carries no plan where one is needed: ``retie`` of a model never shared), or a conv is not shared the way
    the call needs (the coefficients of a conv that is not soft-shared)."""


# -- files ------------------------------------------------------------------------------------------------------


class FileError(ShareError):
    """Base of the errors about files read or written."""


class MissingFileError(FileError, FileNotFoundError):
    """An input file (a ShaResNet file, a checkpoint) does not exist."""


class FileFormatError(FileError, ValueError):
    """A file is not what it must be: not safetensors, corrupt, truncated, or without share_transform metadata."""


class CheckpointError(FileError, ValueError):
    """A checkpoint does not fit the model (keys, shapes) or holds pickled objects other than tensors."""


class MetaTensorError(FileError, ValueError):
    """A tensor of the model has no data (it lives on the meta device), so it cannot be written."""


class OutputExistsError(FileError, FileExistsError):
    """The output file exists and overwriting was not asked for, or it is not a regular file."""


class ExportError(FileError, RuntimeError):
    """The ONNX export failed, or the exported graph does not match the model (sharing or outputs)."""
