"""Exceptions raised by share_transform.

Every error the package raises on bad input derives from :class:`ShareError`, so callers (and the
``sharetx`` CLI) can catch one class. Each subclass also derives from the built-in exception a
Python user would expect (``TypeError`` for a wrong argument type, ``ValueError`` for a bad value).
"""

from __future__ import annotations


class ShareError(Exception):
    """Base class of every error share_transform raises on bad input."""


class NotAModuleError(ShareError, TypeError):
    """The argument is not a ``torch.nn.Module``."""


class UnknownPolicyError(ShareError, ValueError):
    """The sharing policy is not one of the known policies."""


class TraceError(ShareError):
    """torch.fx could not trace the model, not even with timm's notrace modules."""


class InputSizeError(ShareError, ValueError):
    """The model rejected the input size used for shape propagation."""


class NoSpatialConvError(ShareError):
    """The model has no residual block with a spatial conv: there is nothing to share."""


class PlanMismatchError(ShareError, ValueError):
    """A plan does not fit the model it is applied to."""


class ShareOptionError(ShareError, ValueError):
    """A sharing option (group size, scope, templates, budget) is out of range, conflicts with another, or
    cannot be met."""


class WarmStartError(ShareOptionError):
    """A warm start that cannot be made: ``init`` does not fit the groups (``"svd"`` for hard groups, ``"mean"`` for
    soft ones), or ``"mean-scaled"`` finds no BatchNorm to fold a member's scales into."""


class UnknownModelError(ShareError, ValueError):
    """No timm or torchvision model has this name."""


class DataError(ShareError, ValueError):
    """Training data is missing, empty, malformed or not laid out as the recipe expects."""


class ModelArgumentError(ShareError, TypeError, ValueError):
    """The model's constructor does not take the arguments given, or not their values (a WRN depth off 6n+4)."""


class UnknownInitError(ShareError, ValueError):
    """The init mode of a shared weight is not one of the known modes."""


class MissingFileError(ShareError, FileNotFoundError):
    """An input file (a ShaResNet file, a checkpoint) does not exist."""


class FileFormatError(ShareError, ValueError):
    """A file is not what it must be: not safetensors, corrupt, truncated, or without share_transform metadata."""


class CheckpointError(ShareError, ValueError):
    """A checkpoint does not fit the model (keys, shapes) or holds pickled objects other than tensors."""


class MetaTensorError(ShareError, ValueError):
    """A tensor of the model has no data (it lives on the meta device), so it cannot be written."""


class OutputExistsError(ShareError, FileExistsError):
    """The output file exists and overwriting was not asked for."""


class OutputLockedError(ShareError, RuntimeError):
    """Another process is writing the output directory (a run on the same ``--output``); the message names its PID."""


class ExportError(ShareError, RuntimeError):
    """The ONNX export failed, or the exported graph does not match the model (sharing or outputs)."""


class ConfigError(ShareError, ValueError):
    """A flag combination that cannot run (batch not divisible by the world size, no CUDA, ...)."""


class NonFiniteLossError(ShareError, FloatingPointError):
    """The training loss became NaN or infinite; training stopped before writing anything from that step.

    ``epoch`` and ``step`` are 0-based (``step`` counts from the start of the run); the message is 1-based.
    """

    def __init__(self, message: str, *, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class ReportError(ShareError, ValueError):
    """A run directory is missing its files or holds malformed ones."""
