"""Checkpoints of a training run: weights through ``share_transform.save``, the rest in a tensor-only file.

A checkpoint ``TAG`` (``last`` after every epoch, ``best`` at the best test top-1) is two files in the
output directory:

* ``checkpoint-TAG.safetensors``: the model, each shared weight stored once, loadable on its own with
  ``share_transform.load`` (which rebuilds the architecture and re-ties the shared convs); its
  metadata carries ``epoch``;
* ``checkpoint-TAG.state.pt``: optimizer and scheduler state, epochs done, global step, best error and
  the metrics history; read back only with ``torch.load(..., weights_only=True)``.

Each file is written to a temporary name beside it, fsynced, then renamed over the old one
(``share_transform.io.atomic_write``), so a kill at any moment leaves the previous complete file. Both
files carry the epoch; a resume that finds them disagree (a kill between the two renames) refuses.

Random state: the training process reseeds its generators from ``(seed, epoch, rank)`` at the start of
every epoch and data augmentation is seeded per sample (see :mod:`.data`), so the RNG state at an epoch
boundary is a function of the seed and needs no storing; this is what makes a resumed run, on every
rank, bit-identical to an uninterrupted one in ``--deterministic`` mode.

Example:
    >>> save_checkpoint(out, "last", model, {"epoch": 3, "optimizer": opt.state_dict(), ...})
    >>> state = load_checkpoint(out, "last", model)  # weights copied into ``model`` in place
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, MissingFileError
from ..io import atomic_write, read_info, save
from ..io import load_checkpoint as load_weights_file


def weights_path(output: Path, tag: str) -> Path:
    return Path(output) / f"checkpoint-{tag}.safetensors"


def state_path(output: Path, tag: str) -> Path:
    return Path(output) / f"checkpoint-{tag}.state.pt"


def has_checkpoint(output: Path, tag: str = "last") -> bool:
    """True when either file of checkpoint ``tag`` exists (a half-written pair counts: never overwrite it)."""
    return weights_path(output, tag).exists() or state_path(output, tag).exists()


def save_checkpoint(output: Path, tag: str, model: nn.Module, state: dict[str, Any]) -> None:
    """Write checkpoint ``tag``: ``model`` (unwrapped: no DDP, no compile) and ``state`` (needs ``"epoch"``)."""
    save(model, weights_path(output, tag), metadata={"epoch": str(state["epoch"]), "checkpoint": tag})
    atomic_write(state_path(output, tag), lambda tmp: torch.save(state, tmp))


def load_checkpoint(output: Path, tag: str, model: nn.Module, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Copy checkpoint ``tag``'s weights into ``model`` in place and return its state dict.

    Copying keeps the model's own ``Parameter`` objects, so its ties, its device placement and an
    optimizer built on it all stay valid.

    Raises:
        MissingFileError: a file of the pair is missing.
        CheckpointError: the state file is unreadable, or the two files are of different epochs.
        share_transform.ShareError: the weights file is corrupt or does not fit ``model``.
    """
    wpath, spath = weights_path(output, tag), state_path(output, tag)
    for p in (wpath, spath):
        if not p.is_file():
            raise MissingFileError(f"cannot resume: {p} is missing")
    try:
        state = torch.load(spath, map_location=device, weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
    ) as e:  # what torch raises for bad files
        raise CheckpointError(f"cannot resume: {spath} is unreadable ({type(e).__name__})") from None
    file_epoch = read_info(wpath).user.get("epoch")
    if file_epoch is not None and int(file_epoch) != state.get("epoch"):
        raise CheckpointError(
            f"cannot resume: {wpath.name} is from epoch {file_epoch} but {spath.name} from epoch "
            f"{state.get('epoch')} (the run was killed while saving); start afresh in another --output"
        )
    load_weights_file(model, wpath)
    return state
