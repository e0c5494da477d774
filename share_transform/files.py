"""The ShaResNet file format: safetensors in which each shared weight is stored once.

A ShaResNet's point is to be small in memory *and on disk* (Boulch, arXiv 1702.08782: low-memory systems).
``safetensors.torch.save_file`` refuses tensors that share memory (docs/design.md, Tie traps), so :func:`save`
stores each distinct tensor once, under its first name (the one a tied model's ``state_dict()`` lists), and
records the other names as aliases. The file's metadata (all strings, as
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

Reading other checkpoints (``torch.save`` files, foreign safetensors) is :mod:`share_transform.checkpoints`'.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import SOURCES, build_model, check_model_kwargs
from .errors import (
    CheckpointError,
    FileFormatError,
    MetaTensorError,
    MissingFileError,
    PlanMismatchError,
    ShareError,
)
from .fs import atomic_write
from .modelinfo import build_spec, check_model, model_name
from .planning import SharePlan
from .tie import apply, check_state_fits, get_plan, is_tied, retie, state_tensors, tensor_aliases
from .version import __version__

__all__ = ["FileInfo", "load", "read_info", "save"]

#: Version of the metadata layout below; bumped when a reader would misread a newer file.
FILE_VERSION = "1"
KEY_PREFIX = "sharetx."
KEY_FILE_VERSION = KEY_PREFIX + "file_version"
KEY_VERSION = KEY_PREFIX + "version"
KEY_BUILD = KEY_PREFIX + "build"
KEY_POLICY = KEY_PREFIX + "policy"
KEY_PLAN = KEY_PREFIX + "plan"
KEY_ALIASES = KEY_PREFIX + "aliases"

#: Largest header read (the safetensors library's own limit): a header holds names and metadata, not weights.
MAX_HEADER_BYTES = 100_000_000
#: safetensors' dtype codes; tensor bytes are little-endian, as the format says.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
# A build record names a registered architecture, never a hub or local-directory reference (hf-hub:, local-dir:).
_ARCH_NAME = re.compile(r"[A-Za-z0-9_]+")

# --------------------------------------------------------------------------------------------- writing


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each distinct tensor once (first name wins), and ``{alias: stored name}``."""
    aliases = {alias: names[0] for names in tensor_aliases(model) for alias in names[1:]}
    # ``apply``'s hook already leaves the aliases out; a model tied by other means lists them.
    stored = {k: t.detach().contiguous() for k, t in model.state_dict(keep_vars=True).items() if k not in aliases}
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
        NotAModuleError; FileFormatError for bad metadata, or build kwargs outside
        :data:`share_transform.build.MODEL_KWARGS` (``load`` would refuse them); MetaTensorError for a tensor
        without data; OutputExistsError when ``path`` is not a regular file; OSError when the directory
        cannot be written.

    Example:
        >>> model = share_transform.apply(share_transform.build_model("resnet152"))
        >>> share_transform.save(model, "resnet152-share.safetensors")  # 147 MB instead of 241 MB
    """
    model = check_model(model)
    name = model_name(model)
    header = {"format": "pt", KEY_FILE_VERSION: FILE_VERSION, KEY_VERSION: __version__}
    header.update(_check_user_metadata(metadata, name))
    spec = build_spec(model)
    if spec is not None:
        # Only what ``load`` accepts back: a file that records other arguments would not load.
        check_model_kwargs(spec["kwargs"], where=f"{name}: save", error=FileFormatError)
        header[KEY_BUILD] = json.dumps(spec, sort_keys=True)
    share_plan = get_plan(model)
    if share_plan is not None:
        header[KEY_POLICY] = share_plan.policy
        header[KEY_PLAN] = json.dumps(share_plan.to_dict(), separators=(",", ":"))
    tensors, aliases = _unique_state(model)
    header[KEY_ALIASES] = json.dumps(aliases, separators=(",", ":"))
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise MetaTensorError(
                f"{name}: {key} has no data (meta device); materialise the model first, e.g. "
                "model.to_empty(device='cpu') then share_transform.retie(model) and load weights"
            )
        if tensor.dtype not in DTYPE_CODES:
            raise FileFormatError(f"{name}: {key} is {tensor.dtype}, which safetensors cannot store")
    return atomic_write(path, lambda tmp: _write_safetensors(tmp, tensors, header))


def _write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """The safetensors layout: 8-byte little-endian header length, JSON header padded to 8 bytes, raw tensors.

    Written here rather than by ``safetensors.torch.save_file`` so that the one temporary file of
    :func:`share_transform.fs.atomic_write` is the only copy (and an ``OSError`` names the destination).
    Largest items first, as safetensors orders them, so that every tensor starts aligned to its item size.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in order:
        t = tensors[key]
        end = offset + t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key in order:
            flat = tensors[key].detach().cpu().contiguous().reshape(-1)
            if flat.numel() and flat.stride(0) != 1:  # "contiguous" ignores the stride of a size-1 dim
                flat = flat.clone(memory_format=torch.contiguous_format)
            f.write(flat.view(torch.uint8).numpy().data)


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
    # Where each stored tensor's bytes lie: (start, end) in the file.
    spans: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    @property
    def stored_numel(self) -> int:
        """Elements stored in the file (parameters and buffers, each shared weight once)."""
        return sum(_numel(shape) for _, shape in self.tensors.values())

    @property
    def is_sharetx(self) -> bool:
        return self.version is not None


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def existing_file(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such {what}")
    if not path.is_file():
        raise FileFormatError(f"{path}: not a file")
    return path


def looks_like_safetensors(path: Path) -> bool:
    """Safetensors files start with an 8-byte header length and a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _json(header: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(header[key])
    except (json.JSONDecodeError, TypeError) as e:
        raise FileFormatError(f"{path}: metadata {key!r} is not valid JSON ({e}); the file is corrupt") from None


def _invalid(path: Path, reason: str) -> FileFormatError:
    return FileFormatError(f"{path}: not a valid safetensors file ({reason})")


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]]:
    """The metadata and ``{name: (dtype, shape, (start, end))}`` of a safetensors file, checked against its size.

    Reads at most :data:`MAX_HEADER_BYTES`; the tensors must tile the data that follows the header exactly,
    so nothing later reads past the file or trusts a shape its bytes do not back.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _invalid(path, f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _invalid(path, f"header length {n:,} exceeds the file ({size:,} bytes) or {MAX_HEADER_BYTES:,}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _invalid(path, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _invalid(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "__metadata__ must map strings to strings")
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, span = entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"])
            ok = dtype in DTYPES and len(span) == 2 and all(type(x) is int and x >= 0 for x in (*shape, *span))
        except (KeyError, TypeError) as e:
            raise _invalid(path, f"tensor {name!r}: malformed entry ({e!r})") from None
        if not ok or span[1] - span[0] != _numel(shape) * DTYPES[dtype].itemsize:
            raise _invalid(path, f"tensor {name!r}: dtype, shape and offsets disagree ({entry})")
        tensors[name] = (dtype, shape, (8 + n + span[0], 8 + n + span[1]))
    end = 8 + n
    for _, _, (start, stop) in sorted(tensors.values(), key=lambda t: t[2]):
        if start != end:
            raise _invalid(path, "tensor data overlaps or leaves gaps")
        end = stop
    if end != size:
        raise _invalid(path, f"the header describes {end:,} bytes but the file holds {size:,} (truncated?)")
    return metadata, tensors


def _check_build(build: Any, path: Path) -> dict[str, Any]:
    """A build record that names a registered architecture and passes only allowed constructor arguments."""
    where = f"{path}: the recorded build"
    if not isinstance(build, dict) or set(build) - {"source", "name", "kwargs"}:
        raise FileFormatError(f"{where} must be an object with source, name and kwargs, got {build!r}")
    source, name, kwargs = build.get("source"), build.get("name"), build.get("kwargs", {})
    if source not in SOURCES:
        raise FileFormatError(f"{where} names source {source!r}; expected one of {', '.join(SOURCES)}")
    if not isinstance(name, str) or not _ARCH_NAME.fullmatch(name):
        raise FileFormatError(f"{where} names model {name!r}, which is not an architecture name")
    check_model_kwargs(kwargs, where=where, error=FileFormatError)
    return {"source": source, "name": name, "kwargs": kwargs}


def read_info(path: str | os.PathLike[str]) -> FileInfo:
    """Read a safetensors file's header: its tensors, aliases, build record, plan and user metadata.

    The header is read and checked by share_transform itself (bounded size, tensors that fit the file);
    the build record must name an architecture and only the constructor arguments in
    :data:`share_transform.build.MODEL_KWARGS`, so nothing in a file can make ``load`` read another file.

    Raises:
        MissingFileError; FileFormatError for a file that is not safetensors, is truncated or corrupt, or
        whose share_transform metadata is malformed or names a refused constructor argument.
    """
    path = existing_file(path, "file")
    header, entries = _read_header(path)
    plan = None
    if KEY_PLAN in header:
        try:
            plan = SharePlan.from_dict(_json(header, KEY_PLAN, path))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FileFormatError(f"{path}: the recorded share plan is malformed ({e!r})") from None
    aliases = _json(header, KEY_ALIASES, path) if KEY_ALIASES in header else {}
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and v in entries for k, v in aliases.items()):
        raise FileFormatError(f"{path}: metadata {KEY_ALIASES!r} must map names to stored tensors; the file is corrupt")
    return FileInfo(
        path=path,
        file_bytes=path.stat().st_size,
        tensors={k: (dtype, shape) for k, (dtype, shape, _) in entries.items()},
        aliases=aliases,
        build=_check_build(_json(header, KEY_BUILD, path), path) if KEY_BUILD in header else None,
        policy=header.get(KEY_POLICY),
        plan=plan,
        version=header.get(KEY_VERSION),
        user={k: v for k, v in header.items() if k != "format" and not k.startswith(KEY_PREFIX)},
        spans={k: span for k, (_, _, span) in entries.items()},
    )


def _read_tensor(f: BufferedReader, info: FileInfo, name: str) -> torch.Tensor:
    dtype, shape = info.tensors[name]
    start, end = info.spans[name]
    f.seek(start)
    data = bytearray(end - start)
    if f.readinto(data) != len(data):
        raise FileFormatError(f"{info.path}: truncated while reading {name}")
    if not data:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file on the CPU, a ShaResNet file's aliases expanded (each gets its stored
    tensor)."""
    info = read_info(path)
    with open(info.path, "rb") as f:
        state = {name: _read_tensor(f, info, name) for name in info.tensors}
    for alias, stored in info.aliases.items():
        state[alias] = state[stored]
    return state


def _dtype_kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "floating" if dtype.is_floating_point else "integer"


def _check_fits(model: nn.Module, info: FileInfo) -> None:
    """Every name, shape and dtype kind of the file's header, and the total element count, fit ``model``."""
    own = state_tensors(model)
    shapes = {k: shape for k, (_, shape) in info.tensors.items()}
    shapes.update({alias: shapes[stored] for alias, stored in info.aliases.items()})
    check_state_fits(str(info.path), model, shapes, own)
    kinds = [
        f"{k} ({dtype} in the file, {own[k].dtype} in the model)"
        for k, (dtype, _) in info.tensors.items()
        if _dtype_kind(DTYPES[dtype]) != _dtype_kind(own[k].dtype)
    ]
    if kinds:
        raise CheckpointError(f"{info.path} does not fit {model_name(model)}: dtype mismatch at {', '.join(kinds[:3])}")
    distinct = {id(t): t.numel() for t in own.values()}
    if sum(distinct.values()) != info.stored_numel:
        raise CheckpointError(
            f"{info.path} stores {info.stored_numel:,} elements but its recorded architecture "
            f"{model_name(model)} holds {sum(distinct.values()):,} (its weights are tied otherwise); "
            "the file is corrupt"
        )


def _build_recorded(info: FileInfo, device: str | torch.device) -> nn.Module:
    """The recorded architecture on ``device``, tied as recorded, with uninitialised weights."""
    assert info.build is not None
    spec = info.build
    try:
        # On the meta device first: a file cannot make this allocate more than its own header describes.
        with torch.device("meta"):
            model = build_model(spec["name"], source=spec["source"], **spec["kwargs"])
    except ShareError as e:
        raise FileFormatError(f"{info.path}: cannot rebuild the recorded model ({e})") from None
    if info.plan is not None:
        try:
            apply(model, plan=info.plan)
        except PlanMismatchError as e:
            raise CheckpointError(
                f"{info.path}: the recorded plan does not fit the recorded architecture ({e})"
            ) from None
    _check_fits(model, info)
    if any(m._non_persistent_buffers_set for m in model.modules()):
        # Buffers the file does not hold (a blur filter) are computed by the constructor: build for real.
        model = build_model(spec["name"], source=spec["source"], **spec["kwargs"]).to(device)
        if info.plan is not None:
            apply(model, plan=info.plan)
        return model
    model.to_empty(device=device)  # gives every module its own new Parameter: tie them again
    return retie(model) if info.plan is not None else model


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a ShaResNet file holds, tie it as it was saved, and load its weights.

    The build record is checked first (only the constructor arguments of
    :data:`share_transform.build.MODEL_KWARGS`; nothing is downloaded or read but this file). The model is
    built on the meta device and tied with the recorded plan; every tensor name, shape, dtype kind and the
    total element count are compared with the file's header; only then is the model materialised on
    ``device`` (no random init), re-tied (so ``get_plan``, ``retie`` and ``is_tied`` work) and every tensor
    copied in. The module is returned in training mode, as built.

    Raises:
        MissingFileError; FileFormatError for a file that is not safetensors, is truncated or corrupt, names
        a refused constructor argument, or does not say how to build its model (then build it yourself and
        use :func:`load_checkpoint`); CheckpointError when the tensors do not fit the recorded architecture.

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
            "share_transform.load_checkpoint(model, path)"
        )
    model = _build_recorded(info, device)
    own = state_tensors(model)
    with open(path, "rb") as f, torch.no_grad():
        for name in info.tensors:
            own[name].copy_(_read_tensor(f, info, name))
        for alias, stored in info.aliases.items():
            if own[alias] is not own[stored]:
                own[alias].copy_(own[stored])
    if info.plan is not None and not is_tied(model):
        raise FileFormatError(f"{path}: the rebuilt model is not tied as the recorded plan says")
    return model
