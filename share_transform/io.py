"""ShaResNet files: safetensors in which each shared weight is stored once, and checkpoint reading.

A ShaResNet's point is to be small in memory *and on disk* (Boulch, arXiv 1702.08782: low-memory systems).
``state_dict()`` lists a shared weight under every member's name and ``safetensors.torch.save_file``
refuses tensors that share memory (docs/design.md, Tie traps), so :func:`save` stores each distinct tensor once,
under its first name, and records the other names as aliases. The file's metadata (all strings, as
safetensors requires) says how to rebuild and re-tie the model:

====================  ==========================================================================
key                   value
====================  ==========================================================================
``format``            ``"pt"`` (the safetensors convention for PyTorch files)
``sharetx.version``   the share_transform version that wrote the file
``sharetx.build``     JSON ``{"source", "name", "kwargs"}`` from :func:`share_transform.build_spec`
``sharetx.policy``    the sharing policy (absent for a model that was never shared)
``sharetx.plan``      JSON of :meth:`SharePlan.to_dict` (the groups: which convs share which weight)
``sharetx.aliases``   JSON ``{alias: stored name}`` for every state-dict entry not stored itself
====================  ==========================================================================

Because every alias is one of a tied model's own names, a file also loads with plain
``safetensors.torch.load_model`` into a model that :func:`share_transform.apply` has already tied.

Checkpoints to convert (:func:`read_checkpoint`) may be safetensors or ``torch.save`` files; the latter are
read with ``torch.load(weights_only=True)`` only, never unpickling arbitrary objects (docs/design.md, File format).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .apply import apply, get_plan, is_tied
from .build import build_model, build_spec
from .errors import CheckpointError, FileFormatError, MissingFileError, ShareError
from .fs import atomic_write
from .modelinfo import check_model, model_name
from .plan import SharePlan

__all__ = [
    "FileInfo",
    "load",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint",
    "read_info",
    "save",
]

#: Version of the metadata layout below; bumped when a reader would misread a newer file.
FILE_VERSION = "1"
KEY_PREFIX = "sharetx."
KEY_FILE_VERSION = KEY_PREFIX + "file_version"
KEY_VERSION = KEY_PREFIX + "version"
KEY_BUILD = KEY_PREFIX + "build"
KEY_POLICY = KEY_PREFIX + "policy"
KEY_PLAN = KEY_PREFIX + "plan"
KEY_ALIASES = KEY_PREFIX + "aliases"

#: Suffixes read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: Top-level keys under which training scripts nest the state dict (timm, Lightning, torchvision refs).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "model_ema", "state_dict_ema")
#: Key prefixes wrappers add: DDP/DataParallel, Lightning modules holding ``self.model``, torch.compile.
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")


def _package_version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------- writing


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each distinct tensor once (first name wins), and ``{alias: stored name}``."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)  # Parameters shared by ``apply`` are the same object under every name
        if key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        stored[name] = tensor.detach().contiguous()
    return stored, aliases


def _check_user_metadata(metadata: Mapping[str, str] | None, name: str) -> dict[str, str]:
    user = dict(metadata or {})
    for key, value in user.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise FileFormatError(
                f"{name}: metadata must map str to str (safetensors stores strings), got {key!r}: "
                f"{type(value).__name__}; encode other values, e.g. with json.dumps"
            )
        if key == "format" or key.startswith(KEY_PREFIX):
            raise FileFormatError(f"{name}: metadata key {key!r} is reserved by share_transform")
    return user


def save(model: nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` to a safetensors file, each shared weight once, atomically.

    The file records how to rebuild the model (when :func:`share_transform.build_model` built it), its
    policy and share plan (when :func:`share_transform.apply` tied it) and the aliases of its shared
    weights, so :func:`load` returns an equal, tied model. An existing file at ``path`` is replaced
    atomically (readers never see a partial file; on failure nothing is left behind).

    Args:
        model: any module; shared or not.
        path: output file (``.safetensors`` by convention).
        metadata: extra ``str -> str`` entries for the header (e.g. ``{"epoch": "90"}``); keys
            ``format`` and ``sharetx.*`` are reserved. :func:`read_info` returns them as ``user``.

    Returns:
        The path written.

    Raises:
        NotAModuleError; FileFormatError for bad metadata or build kwargs that are not JSON;
        OSError when the directory cannot be written.

    Example:
        >>> model = share_transform.apply(share_transform.build_model("resnet152"))
        >>> share_transform.save(model, "resnet152-share.safetensors")  # 147 MB instead of 241 MB
    """
    model = check_model(model)
    name = model_name(model)
    header = {"format": "pt", KEY_FILE_VERSION: FILE_VERSION, KEY_VERSION: _package_version()}
    header.update(_check_user_metadata(metadata, name))
    spec = build_spec(model)
    if spec is not None:
        try:
            header[KEY_BUILD] = json.dumps(spec, sort_keys=True)
        except TypeError as e:
            raise FileFormatError(
                f"{name}: the constructor kwargs {spec['kwargs']!r} cannot be recorded as JSON ({e})"
            ) from None
    share_plan = get_plan(model)
    if share_plan is not None:
        header[KEY_POLICY] = share_plan.policy
        header[KEY_PLAN] = json.dumps(share_plan.to_dict(), separators=(",", ":"))
    tensors, aliases = _unique_state(model)
    header[KEY_ALIASES] = json.dumps(aliases, separators=(",", ":"))
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FileInfo:
    """What a ShaResNet file holds, read from its header alone (no tensor data is read)."""

    path: Path
    file_bytes: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # stored name -> (dtype, shape)
    aliases: dict[str, str]  # alias -> stored name
    build: dict[str, Any] | None  # {"source", "name", "kwargs"}; None when the model was built elsewhere
    policy: str | None
    plan: SharePlan | None
    version: str | None  # share_transform version that wrote it; None for a foreign safetensors file
    user: dict[str, str] = field(default_factory=dict)  # the ``metadata`` given to ``save``

    @property
    def stored_numel(self) -> int:
        """Elements stored in the file (parameters and buffers, each shared weight once)."""
        total = 0
        for _, shape in self.tensors.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @property
    def is_sharetx(self) -> bool:
        return self.version is not None


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such {what}")
    if not path.is_file():
        raise FileFormatError(f"{path}: not a file")
    return path


def _looks_like_safetensors(path: Path) -> bool:
    """Safetensors files start with an 8-byte header length and a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _json(header: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(header[key])
    except (json.JSONDecodeError, TypeError) as e:
        raise FileFormatError(f"{path}: metadata {key!r} is not valid JSON ({e}); the file is corrupt") from None


def read_info(path: str | os.PathLike[str]) -> FileInfo:
    """Read a safetensors file's header: its tensors, aliases, build record, plan and user metadata.

    Raises:
        MissingFileError; FileFormatError for a file that is not safetensors, or is truncated or corrupt.
    """
    path = _existing_file(path, "file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                s = f.get_slice(key)
                tensors[key] = (s.get_dtype(), tuple(s.get_shape()))
    except SafetensorError as e:
        raise FileFormatError(f"{path}: not a valid safetensors file ({e})") from None
    plan = None
    if KEY_PLAN in header:
        try:
            plan = SharePlan.from_dict(_json(header, KEY_PLAN, path))
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{path}: the recorded share plan is malformed ({e!r})") from None
    return FileInfo(
        path=path,
        file_bytes=path.stat().st_size,
        tensors=tensors,
        aliases=_json(header, KEY_ALIASES, path) if KEY_ALIASES in header else {},
        build=_json(header, KEY_BUILD, path) if KEY_BUILD in header else None,
        policy=header.get(KEY_POLICY),
        plan=plan,
        version=header.get(KEY_VERSION),
        user={k: v for k, v in header.items() if k != "format" and not k.startswith(KEY_PREFIX)},
    )


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, aliases expanded (an alias gets its stored tensor)."""
    info = read_info(path)
    try:
        state = load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise FileFormatError(f"{path}: not a valid safetensors file ({e})") from None
    for alias, stored in info.aliases.items():
        if stored not in state:
            raise FileFormatError(f"{path}: alias {alias!r} names {stored!r}, which the file does not hold")
        state[alias] = state[stored]
    return state


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

    ``torch.save`` files (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) are read with
    ``torch.load(weights_only=True)`` only, so a file holding pickled objects other than tensors and plain
    containers is refused rather than executed. A state dict nested under a common wrapper key
    (``state_dict``, ``model``, ...) is unwrapped; key prefixes are left to :func:`load_checkpoint`, which
    knows the model's names. A ShaResNet file's aliases are expanded, so every name has its tensor.

    Raises:
        MissingFileError; FileFormatError for an unknown, truncated or corrupt file; CheckpointError for
        pickled objects other than tensors or a file that holds no state dict.
    """
    path = _existing_file(path, "checkpoint")
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path):
        return _read_safetensors(path, "cpu")
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise FileFormatError(
            f"{path}: not a safetensors file, and {path.suffix or 'no suffix'} is not a torch.save suffix "
            f"({', '.join(TORCH_SUFFIXES)}); give a .safetensors or .pth checkpoint"
        )
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before failing on random bytes
            warnings.simplefilter("ignore")
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


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Copy ``state`` into ``model`` after checking that every name and shape fits, exactly.

    Wrapper prefixes are stripped first. Tied parameters may appear under every alias (all are copied into
    the one Parameter, so they must hold equal values) or under one (the rest count as present). Dtypes are
    cast to the model's.

    Raises:
        CheckpointError naming the missing and unexpected keys and the shape mismatches, or two aliases of
        one shared weight with different values.
    """
    model = check_model(model)
    own = model.state_dict(keep_vars=True)
    state = _strip_prefixes(dict(state), set(own))
    # A tied model's aliases are satisfied by any one name of the shared tensor.
    covered = {id(own[k]) for k in state if k in own}
    missing = [k for k, v in own.items() if k not in state and id(v) not in covered]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (checkpoint {'x'.join(map(str, state[k].shape)) or 'scalar'}, "
        f"model {'x'.join(map(str, own[k].shape)) or 'scalar'})"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        # The aliases of one shared weight must agree: copying differing values into one Parameter would
        # silently keep whichever came last (an unshared checkpoint loaded into a tied model).
        first: dict[int, str] = {}
        for k in state:
            name = first.setdefault(id(own[k]), k)
            if name != k and not torch.equal(state[name], state[k]):
                raise CheckpointError(
                    f"{source} holds different weights under {name} and {k}, which {model_name(model)} shares. "
                    "It is an unshared checkpoint: load it before share_transform.apply (init='mean' averages "
                    "the kernels), or convert it with sharetx convert --checkpoint"
                )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_names(shapes)}")
        raise CheckpointError(
            f"{source} does not fit {model_name(model)}: {'; '.join(parts)}. "
            "Was it saved from another architecture? Check --model, --source and --num-classes"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint file (see :func:`read_checkpoint`) into ``model``, checking that it fits."""
    return load_weights(model, read_checkpoint(path), source=str(path))


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a ShaResNet file holds, tie it as it was saved, and load its weights.

    The model is built with :func:`share_transform.build_model` from the file's build record (random init,
    nothing downloaded), moved to ``device``, tied with the recorded plan (so ``get_plan``, ``retie`` and
    ``is_tied`` work), then every tensor is copied in. The module is returned in training mode, as built.

    Raises:
        MissingFileError; FileFormatError for a file that is not safetensors, is truncated or corrupt, or
        does not say how to build its model (then build it yourself and use :func:`load_weights` with
        :func:`read_checkpoint`); CheckpointError when the tensors do not fit the rebuilt model.

    Example:
        >>> model = share_transform.load("resnet152-share.safetensors")
        >>> share_transform.count_parameters(model)
        36821032
    """
    path = Path(path)
    info = read_info(path)
    if info.build is None:
        raise FileFormatError(
            f"{path}: the file does not record how to build its model (it was not saved by "
            "share_transform.save from a model made by build_model); build the model yourself and call "
            "share_transform.io.load_checkpoint(model, path)"
        )
    spec = info.build
    try:
        model = build_model(spec["name"], source=spec["source"], **spec.get("kwargs", {}))
    except ShareError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path}: cannot rebuild the recorded model {spec!r} ({e})") from None
    # Move before tying: ``.to`` on a tied model can untie it (docs/design.md, Tie traps).
    model.to(device)
    if info.plan is not None:
        apply(model, plan=info.plan)
    load_weights(model, _read_safetensors(path, device), source=str(path))
    if info.plan is not None and not is_tied(model):
        raise FileFormatError(f"{path}: the rebuilt model is not tied as the recorded plan says")
    return model
