"""Errors the training engine raises on bad input; each is a :class:`share_transform.errors.ShareError`.

Checkpoint and output-directory problems raise the package's own ``CheckpointError``,
``MissingFileError`` and ``OutputExistsError``. A recipe catches ``ShareError`` around ``main`` (see :func:`share_transform.engine.run_recipe`) and turns
it into one ``error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

from ..errors import ShareError


class ConfigError(ShareError, ValueError):
    """A flag combination that cannot run (batch not divisible by the world size, no CUDA, ...)."""


class DataError(ShareError, ValueError):
    """The data directory is missing, empty or not laid out as the recipe expects."""


class NonFiniteLossError(ShareError, FloatingPointError):
    """The training loss became NaN or infinite; training stopped before writing anything from that step."""

    def __init__(self, message: str, *, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
