"""Checkpoints of a training run: weights through ``share_transform.save``, the rest in a tensor-only file.

A checkpoint ``TAG`` (``last`` after every epoch, ``best`` at the best test top-1) is two files in the
output directory:

* ``checkpoint-TAG.safetensors``: the model, each shared weight stored once, loadable on its own with
  ``share_transform.load`` (which rebuilds the architecture and re-ties the shared convs); its
  metadata carries ``epoch``;
* ``checkpoint-TAG.state.pt``: optimizer and scheduler state, epochs done, global step, best error, the
  metrics history and the run's record (``run.json``'s content, so a resume checks its flags against what the
  checkpoint was trained with even when ``run.json`` is gone); read back only with
  ``torch.load(..., weights_only=True)``.

Each file is written to a temporary name beside it, fsynced, then renamed over the old one
(``share_transform.fs.atomic_write``), so a kill at any moment leaves the previous complete file. The two
files are also a consistent *pair* at every kill point, because :func:`save_checkpoint` writes them in
this order:

1. the state, as ``checkpoint-TAG.epochN.state.pt`` (the previous epoch's ``checkpoint-TAG.state.pt`` stays);
2. the weights, ``checkpoint-TAG.safetensors``, whose metadata says epoch N;
3. the rename of the epoch-N state to ``checkpoint-TAG.state.pt``, over the previous epoch's.

:func:`load_run_checkpoint` reads the epoch in the weights and takes the state of that epoch: the epoch-stamped
file when a kill came between 2 and 3, else ``checkpoint-TAG.state.pt``. A kill before 2 leaves the previous
pair (and a stray epoch-stamped state). Files that still disagree were not written by this module, and
resuming from them refuses.

The best checkpoint is never lost: an epoch saves ``last`` first, then ``best`` when it improved the best
error, so at any kill point either ``best`` is complete for the best epoch of ``last``'s history, or that best
epoch *is* ``last``'s epoch. On resume :func:`repair_checkpoints` finishes what the kill interrupted: it
completes the pair of the loaded epoch, writes ``best`` again from ``last`` in the second case, and removes
stray epoch-stamped states.

Random state: the training process reseeds its generators from ``(seed, epoch, rank)`` at the start of
every epoch and data augmentation is seeded per sample (see :mod:`.data`), so the RNG state at an epoch
boundary is a function of the seed and needs no storing; this is what makes a resumed run, on every
rank, bit-identical to an uninterrupted one in ``--deterministic`` mode.

Example:
    >>> save_checkpoint(out, "last", model, {"epoch": 3, "optimizer": opt.state_dict(), ...})
    >>> state = load_run_checkpoint(out, "last", model)  # weights copied into ``model`` in place
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import load_checkpoint as load_weights_file
from ..errors import CheckpointError, MissingFileError
from ..files import read_info, save
from ..fs import atomic_write


def weights_path(output: Path, tag: str) -> Path:
    return Path(output) / f"checkpoint-{tag}.safetensors"


def state_path(output: Path, tag: str) -> Path:
    return Path(output) / f"checkpoint-{tag}.state.pt"


def epoch_state_path(output: Path, tag: str, epoch: int) -> Path:
    """The state of epoch ``epoch`` before it takes :func:`state_path`'s name (see the module docstring)."""
    return Path(output) / f"checkpoint-{tag}.epoch{epoch}.state.pt"


def has_checkpoint(output: Path, tag: str = "last") -> bool:
    """True when either file of checkpoint ``tag`` exists (a half-written pair counts: never overwrite it)."""
    return weights_path(output, tag).exists() or state_path(output, tag).exists()


def save_checkpoint(
    output: Path,
    tag: str,
    model: nn.Module,
    state: dict[str, Any],
    *,
    input_size: tuple[int, int, int] | None = None,
) -> None:
    """Write checkpoint ``tag``: ``model`` (unwrapped: no DDP, no compile) and ``state`` (needs ``"epoch"``).

    ``input_size``: the ``(C, H, W)`` the model trains at (the ImageNet recipe's ``--img-size``), recorded in the
    weights file for ``sharetx inspect`` and ``export``. A kill at any point leaves a pair
    :func:`load_run_checkpoint` resumes from: this epoch's or the previous one's.
    """
    epoch = int(state["epoch"])
    _write_state(output, tag, state)
    _write_weights(output, tag, model, epoch, input_size)
    _commit_state(output, tag, epoch)


def _write_state(output: Path, tag: str, state: dict[str, Any]) -> None:
    # Serialised in memory, written as bytes: a full disk is then an OSError naming the file, not torch's
    # RuntimeError from inside its zip writer.
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(buffer.getbuffer())

    atomic_write(epoch_state_path(output, tag, int(state["epoch"])), write)


def _write_weights(
    output: Path, tag: str, model: nn.Module, epoch: int, input_size: tuple[int, int, int] | None
) -> None:
    metadata = {"epoch": str(epoch), "checkpoint": tag}
    save(model, weights_path(output, tag), metadata=metadata, input_size=input_size)


def _commit_state(output: Path, tag: str, epoch: int) -> None:
    # Not fsynced: until the directory reaches the disk the epoch-stamped name is there, which resumes
    # as well; the next atomic_write in this directory fsyncs it.
    os.replace(epoch_state_path(output, tag, epoch), state_path(output, tag))
    _remove_strays(output, tag)


def _remove_strays(output: Path, tag: str) -> None:
    for stray in Path(output).glob(f"checkpoint-{tag}.epoch*.state.pt"):  # states of saves killed before 3
        stray.unlink(missing_ok=True)


def best_epoch(history: list[dict[str, Any]]) -> int | None:
    """The epoch of the lowest held-out top-1 error in ``history`` (the first, on a tie), as ``fit`` picks it.

    An epoch-0 record (the model before the first step) is no candidate: no checkpoint holds it.
    """
    best: tuple[float, int] | None = None
    for record in trained_epochs(history):
        if best is None or record["val_top1_err"] < best[0]:
            best = (record["val_top1_err"], record["epoch"])
    return None if best is None else best[1]


def trained_epochs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history`` without its epoch-0 record (measured before the first step), if it has one."""
    return [r for r in history if r.get("epoch") != 0]


def repair_checkpoints(
    output: Path, model: nn.Module, state: dict[str, Any], *, input_size: tuple[int, int, int] | None = None
) -> None:
    """After :func:`load_run_checkpoint` of ``last`` into ``model``: finish the saves a kill interrupted (rank 0).

    ``last``'s pair is committed under its own names; when the history's best epoch is ``last``'s epoch, ``best``
    is written again from it (the kill may have come before or during its save); stray epoch-stamped states of
    both checkpoints are removed.
    """
    epoch = int(state["epoch"])
    if epoch_state_path(output, "last", epoch).is_file():
        _commit_state(output, "last", epoch)
    _remove_strays(output, "last")
    if best_epoch(state["history"]) == epoch:
        save_checkpoint(output, "best", model, state, input_size=input_size)
    else:
        _remove_strays(output, "best")  # a save of best killed before its weights: its old pair stands


def read_run_record(output: Path, tag: str = "last") -> dict[str, Any] | None:
    """The ``run.json`` record the state of checkpoint ``tag`` carries (``fit`` stores it with every epoch), or
    None when the state is missing, unreadable or older than the record.

    Reads the state file memory-mapped, without its tensors' bytes, so a resume can check its flags against the
    checkpoint before building anything. The checkpoint's record, not ``run.json`` (which a user may delete or
    edit), is what the checkpoint was trained with.
    """
    candidates = sorted(Path(output).glob(f"checkpoint-{tag}.epoch*.state.pt")) + [state_path(output, tag)]
    for path in reversed(candidates):  # a kill between the weights and the rename leaves the newer one stamped
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001  missing or tampered: the resume's own checks name the problem later
            continue
        record = state.get("run") if isinstance(state, dict) else None
        if isinstance(record, dict) and isinstance(record.get("args"), dict):
            return record
    return None


def load_run_checkpoint(
    output: Path, tag: str, model: nn.Module, *, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Copy checkpoint ``tag``'s weights into ``model`` in place and return the state of the same epoch.

    Copying keeps the model's own ``Parameter`` objects, so its ties, its device placement and an
    optimizer built on it all stay valid. Nothing in ``output`` is changed (every rank may call it).

    Raises:
        MissingFileError: the weights, or a state of their epoch, are missing.
        CheckpointError: the state file is unreadable, or of another epoch than the weights.
        share_transform.ShareError: the weights file is corrupt or does not fit ``model``.
    """
    wpath = weights_path(output, tag)
    if not wpath.is_file():
        raise MissingFileError(f"cannot resume: {wpath} is missing")
    text = read_info(wpath).user.get("epoch")
    if text is None or not text.isdigit():
        raise CheckpointError(
            f"cannot resume: {wpath} does not record its epoch (epoch={text!r}); it was not written by a training run"
        )
    file_epoch = int(text)
    spath = state_path(output, tag)
    if epoch_state_path(output, tag, file_epoch).is_file():
        spath = epoch_state_path(output, tag, file_epoch)  # killed after the weights, before the rename
    if not spath.is_file():
        raise MissingFileError(f"cannot resume: {spath} is missing")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before failing on random bytes
            warnings.simplefilter("ignore")
            state = torch.load(spath, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001  a tampered file reaches the restricted unpickler as any of a dozen errors
        raise CheckpointError(f"cannot resume: {spath} is unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise CheckpointError(f"cannot resume: {spath} is not a training state (a dict with an int epoch)")
    if file_epoch != state["epoch"]:
        raise CheckpointError(
            f"cannot resume: {wpath.name} is from epoch {file_epoch} but {spath.name} from epoch "
            f"{state['epoch']} (these files were not written together); start afresh in another --output"
        )
    load_weights_file(model, wpath)
    return state


#: What ``fit`` stores in a state file, and the type each entry must have (``save_checkpoint`` needs only epoch).
STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "epoch": int,
    "global_step": int,
    "optimizer": dict,
    "scheduler": dict,
    "best_top1_err": (int, float),
    "history": list,
}


def check_training_state(state: dict[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``state`` holds :data:`STATE_KEYS` and one history record per epoch
    (after an epoch-0 record, measured before the first step, where the run has one)."""
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"cannot resume: {path} has no valid {key!r} (got {state.get(key)!r:.60})")
    history = state["history"]
    if history and isinstance(history[0], dict) and history[0].get("epoch") == 0:
        history = history[1:]
    if len(history) != state["epoch"] or not all(
        isinstance(r, dict) and r.get("epoch") == i and isinstance(r.get("val_top1_err"), int | float)
        for i, r in enumerate(history, start=1)
    ):
        raise CheckpointError(f"cannot resume: {path} holds a history that is not one record per epoch done")
