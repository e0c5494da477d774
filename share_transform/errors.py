"""Exceptions raised by share_transform's core (the training stack's own are in :mod:`share_transform.train.errors`).

Every error the package raises on bad input derives from :class:`ShareError`, so callers (and the ``sharetx``
CLI) can catch one class, and from the built-in exception a Python user would expect (``TypeError`` for a wrong
argument type, ``ValueError`` for a bad value). They come in groups: :class:`PlanError` for what stops a model
from being planned or tied, :class:`FileError` for files read and written, and the training stack's
``TrainingError``; a few (a model that cannot be built, a missing extra) stand alone. One rule, one class.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
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
    "ShareError",
    "ShareOptionError",
    "TraceError",
    "UnknownInitError",
    "UnknownModelError",
    "UnknownPolicyError",
]


class ShareError(Exception):
    """Base class of every error share_transform raises on bad input."""


# -- building a model -------------------------------------------------------------------------------------------


class NotAModuleError(ShareError, TypeError):
    """The argument is not a ``torch.nn.Module``."""


class UnknownModelError(ShareError, ValueError):
    """No timm or torchvision model has this name, or a CIFAR network's name has a depth its formula refuses."""


class ModelArgumentError(ShareError, TypeError, ValueError):
    """The model's constructor does not take the arguments given, or not their values (a WRN depth off 6n+4)."""


class MissingExtraError(ShareError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


# -- planning and tying -----------------------------------------------------------------------------------------


class PlanError(ShareError):
    """Base of the errors that stop a model from being planned or tied."""


class UnknownPolicyError(PlanError, ValueError):
    """The sharing policy is not one of the registered policies."""


class ShareOptionError(PlanError, ValueError):
    """A sharing option (group size, scope, templates, budget) is out of range, conflicts with another, or
    cannot be met."""


class UnknownInitError(PlanError, ValueError):
    """The init mode of a shared weight is not one of the known modes."""


class TraceError(PlanError):
    """torch.fx could not trace the model, or shape propagation failed inside the pass (the message names the
    graph node)."""


class InputSizeError(PlanError, ValueError):
    """The input size is malformed, or the model itself rejected it during shape propagation."""


class NoSpatialConvError(PlanError):
    """The model has no residual block with a layer the scope shares: there is nothing to share."""


class PlanMismatchError(PlanError, ValueError):
    """A plan does not fit the model it is applied to, or the model is tied otherwise than the plan says."""


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
