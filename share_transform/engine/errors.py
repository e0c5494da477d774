"""Errors the training engine raises on bad input; each is a :class:`share_transform.errors.ShareError`.

Checkpoint and output-directory problems raise the package's own ``CheckpointError``,
``MissingFileError`` and ``OutputExistsError``. A recipe runs ``main`` through
:func:`share_transform.engine.run_recipe`, which turns any ``ShareError`` into one ``error: ...`` line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

from ..errors import DataError, ShareError

__all__ = ["ConfigError", "DataError", "NonFiniteLossError"]


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
