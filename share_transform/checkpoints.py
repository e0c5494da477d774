"""Reading checkpoints to convert or to load into a model: safetensors files, or ``torch.save`` files.

``torch.save`` files are read with ``torch.load(weights_only=True)`` only, never unpickling arbitrary objects
(docs/file-format.md). A state dict nested under a training script's wrapper key, or with a wrapper's key
prefix (DDP, Lightning, ``torch.compile``), is unwrapped; :func:`load_checkpoint` checks that every name and shape
fits the model exactly before copying anything.

Example:
    >>> model = share_transform.build_model("resnet50")
    >>> share_transform.load_checkpoint(model, "resnet50.pth")  # then share_transform.apply(model, init="mean")
"""

from __future__ import annotations

import argparse
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, FileFormatError
from .files import is_safetensors, read_tensors
from .fs import existing_file
from .modelinfo import check_model
from .tie import check_aliases_agree, check_state_fits, state_tensors

__all__ = ["load_checkpoint", "read_checkpoint"]

#: Suffixes read with ``torch.load(weights_only=True)``; ``.tar`` is timm's ``train.py`` and the soft-sharing
#: reference's (``model_best.pth.tar``).
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
#: The only classes a checkpoint may hold besides tensors and plain containers: timm's ``train.py`` stores its
#: arguments as an ``argparse.Namespace`` (rebuilt empty, then filled with plain values; it runs no code).
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
#: Top-level keys under which training scripts nest the state dict (timm, Lightning, torchvision refs).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "model_ema", "state_dict_ema")
#: Key prefixes wrappers add: DDP/DataParallel, Lightning modules holding ``self.model``, torch.compile.
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")


# torch words it two ways: an unknown global, or a global from a blocked module (posix.system).
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
_ZIP_DETAIL = re.compile(r"(failed reading zip archive[^.]*)")


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a ``torch.load`` result: a flat ``{name: tensor}``, perhaps nested in a wrapper."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)][:3]
        raise CheckpointError(
            f"{path}: expected a state dict of tensors (optionally under one of {', '.join(WRAPPER_KEYS)}), "
            f"found non-tensor entries such as {', '.join(others) or 'none (it is empty)'}"
        )
    raise CheckpointError(f"{path}: expected a state dict of tensors, found a {type(obj).__name__}")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint to convert: safetensors, or a ``torch.save`` file.

    ``torch.save`` files (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, and timm's ``.pth.tar``) are read with
    ``torch.load(weights_only=True)`` only, so a file holding pickled objects other than tensors, plain
    containers and an ``argparse.Namespace`` (:data:`SAFE_GLOBALS`: timm's ``train.py`` keeps its arguments in
    one) is refused rather than executed. A state dict nested under a common wrapper key
    (``state_dict``, ``model``, ...) is unwrapped; key prefixes are left to :func:`load_checkpoint`, which
    knows the model's names. A ShaResNet file's aliases are expanded, so every name has its tensor.

    Raises:
        MissingFileError; FileFormatError for an unknown, truncated or corrupt file; CheckpointError for
        pickled objects other than tensors or a file that holds no state dict.
    """
    path = existing_file(path, "checkpoint")
    if path.suffix.lower() == ".safetensors" or is_safetensors(path):
        return read_tensors(path)
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise FileFormatError(
            f"{path}: not a safetensors file, and {path.suffix or 'no suffix'} is not a torch.save suffix "
            f"({', '.join(TORCH_SUFFIXES)}); give a .safetensors or .pth checkpoint"
        )
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before failing on random bytes
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  random bytes reach the restricted unpickler as IndexError, KeyError...
        text = str(e)
        match = _UNSUPPORTED_GLOBAL.search(text)
        if match:
            raise CheckpointError(
                f"{path}: holds a pickled {match.group(1)} object, not only tensors; share_transform reads "
                "torch.save files with torch.load(weights_only=True) and never unpickles arbitrary objects. "
                "Re-save just the weights: torch.save(model.state_dict(), path)"
            ) from None
        # torch's own messages run to paragraphs; keep the one line that says what failed.
        detail = _UNPICKLER_DETAIL.search(text) or _ZIP_DETAIL.search(text)
        reason = detail.group(1).strip() if detail else type(e).__name__
        raise FileFormatError(
            f"{path}: not a readable torch.save checkpoint, truncated or corrupt ({reason})"
        ) from None
    return _unwrap(obj, path)


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``) that every key has and the model lacks."""
    while not set(state) <= expected:
        prefix = next((p for p in KEY_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None or any(k.startswith(prefix) for k in expected):
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Copy ``state`` into ``model`` after checking that every name and shape fits, exactly.

    Wrapper prefixes are stripped first. Tied parameters may appear under every alias (all are copied into
    the one Parameter, so they must hold the same bytes) or under one (the rest count as present). Dtypes
    are cast to the model's.

    Raises:
        CheckpointError naming the missing and unexpected keys and the shape mismatches, or two aliases of
        one shared weight with different contents.
    """
    model = check_model(model)
    own = state_tensors(model)  # every name of a shared tensor is the model's own
    state = _strip_prefixes(dict(state), set(own))
    check_state_fits(source, model, {k: tuple(v.shape) for k, v in state.items()}, own)
    by_tensor: dict[int, list[str]] = {}
    for k in state:
        by_tensor.setdefault(id(own[k]), []).append(k)
    check_aliases_agree(state, by_tensor.values(), model, source)
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint file (see :func:`read_checkpoint`) into ``model``, checking that it fits."""
    return load_weights(model, read_checkpoint(path), source=str(path))
