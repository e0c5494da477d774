"""Exceptions of the training stack (the recipes' engine); the core's are in :mod:`share_transform.errors`.

Each derives from :class:`TrainingError`, a :class:`share_transform.errors.ShareError`, so a recipe turns every
one of them into one ``error:`` line and exit status 2.
"""

from __future__ import annotations

from ..errors import ShareError

__all__ = [
    "ConfigError",
    "DataError",
    "LoaderWorkerError",
    "NonFiniteLossError",
    "OutputLockedError",
    "ReportError",
    "TrainingError",
]


class TrainingError(ShareError):
    """Base of the errors of a training run or its report."""


class ConfigError(TrainingError, ValueError):
    """A flag combination that cannot run (batch not divisible by the world size, no CUDA, ...)."""


class DataError(TrainingError, ValueError):
    """Training data is missing, empty, malformed or not laid out as the recipe expects."""


class OutputLockedError(TrainingError, RuntimeError):
    """Another process is writing the output directory (a run on the same ``--output``); the message names its PID."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The training loss became NaN or infinite; training stopped before writing anything from that step.

    ``epoch`` and ``step`` are 0-based (``step`` counts from the start of the run); the message is 1-based.
    """

    def __init__(self, message: str, *, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class LoaderWorkerError(TrainingError, RuntimeError):
    """A data loader worker process died (killed by a signal, often the out-of-memory killer); the run stopped,
    its last checkpoint kept."""


class ReportError(TrainingError, ValueError):
    """A run directory is missing its files or holds malformed ones."""
