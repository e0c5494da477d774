"""The ShaResNet file format: safetensors in which each shared weight is stored once.

A ShaResNet's point is to be small in memory *and on disk* (Boulch, arXiv 1702.08782: low-memory systems).
``safetensors.torch.save_file`` refuses tensors that share memory (docs/design.md, Tie traps), so :func:`save`
stores each distinct tensor once, under its first name (the one a tied model's ``state_dict()`` lists), and
records the other names as aliases. The file's metadata (all strings, as
safetensors requires) says how to rebuild and re-tie the model:

========================  ======================================================================
key                       value
========================  ======================================================================
``format``                ``"pt"`` (the safetensors convention for PyTorch files)
``sharetx.file_version``  the layout version (:data:`share_transform.header.FILE_VERSION`)
``sharetx.version``       the share_transform version that wrote the file
``sharetx.build``         JSON ``{"source", "name", "kwargs"}`` from :func:`share_transform.build_spec`
``sharetx.policy``        the sharing policy (absent for a model that was never shared)
``sharetx.plan``          JSON of :meth:`SharePlan.to_dict` (the groups: which convs share which weight)
``sharetx.aliases``       JSON ``{alias: stored name}`` for every state-dict entry not stored itself
``sharetx.input_size``    JSON ``[C, H, W]``, the input the model was trained or runs at (``save(input_size=)``)
========================  ======================================================================

Because every alias is one of a tied model's own names, a file also loads with plain
``safetensors.torch.load_model`` into a model that :func:`share_transform.apply` has already tied.

The bytes are read and written by the safetensors library (``safe_open``, ``save_file``), which checks the
format itself; :mod:`share_transform.header` checks share_transform's own entries against a schema and the
tensors before anything is allocated. Reading other checkpoints (``torch.save`` files, foreign safetensors) is
:mod:`share_transform.checkpoints`'.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .build import build_model, check_model_kwargs
from .errors import (
    CheckpointError,
    DeviceError,
    FileFormatError,
    MetaTensorError,
    PlanMismatchError,
    ShareError,
)
from .fs import atomic_write, existing_file
from .header import (
    FILE_VERSION,
    KEY_ALIASES,
    KEY_BUILD,
    KEY_FILE_VERSION,
    KEY_INPUT_SIZE,
    KEY_PLAN,
    KEY_POLICY,
    KEY_PREFIX,
    KEY_VERSION,
    SchemaError,
    parse_header,
)
from .modelinfo import build_spec, check_input_size, check_model, distinct_conv_weights, model_name
from .planning import SharePlan
from .tie import apply, check_state_fits, count_parameters, get_plan, is_tied, retie, state_tensors, tensor_aliases
from .version import __version__

__all__ = ["FileInfo", "load", "read_info", "save"]


# --------------------------------------------------------------------------------------------- writing


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each distinct tensor once (first name wins), and ``{alias: stored name}``."""
    aliases = {alias: names[0] for names in tensor_aliases(model) for alias in names[1:]}
    # ``apply``'s hook already leaves the aliases out; a model tied by other means lists them.
    stored = {k: t.detach().contiguous() for k, t in model.state_dict(keep_vars=True).items() if k not in aliases}
    # save_file refuses distinct tensors that overlap in one storage (views of one buffer): give them their own.
    by_storage: dict[tuple[torch.device, int], list[str]] = {}
    for k, t in stored.items():
        if t.numel() and not t.is_meta:
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(k)
    for names in by_storage.values():
        if len(names) > 1:
            for k in names:
                stored[k] = stored[k].clone()
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


def _storable(tensors: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise unless safetensors stores every dtype of ``tensors`` (the library is the judge: one empty probe each)."""
    for dtype in {t.dtype for t in tensors.values()}:
        try:
            safetensors.torch.save({"probe": torch.empty(0, dtype=dtype)})
        except (ValueError, KeyError, TypeError, SafetensorError):
            key = next(k for k, t in tensors.items() if t.dtype == dtype)
            raise FileFormatError(f"{name}: {key} is {dtype}, which safetensors cannot store") from None


def _shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], frozenset[tuple[str, ...]]]:
    return (
        {k: tuple(t.shape) for k, t in state_tensors(model).items()},
        frozenset(tuple(names) for names in tensor_aliases(model)),
    )


def _timm_build(model: nn.Module, name: str) -> dict[str, Any] | None:
    """The build record of a model ``timm.create_model`` made (not ``build_model``), when it provably rebuilds it.

    timm records the architecture (``pretrained_cfg["architecture"]``) but not the constructor's arguments. The
    record holds the name and the arguments read back from the model (``num_classes``, ``in_chans``); it is
    kept only when that build, on the meta device and tied by the model's plan, has the same state names,
    shapes and ties as the model. None for a model timm did not make.

    Raises:
        FileFormatError naming the way out when the rebuild differs (timm was given other arguments).
    """
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not arch:
        return None
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != 3:
        kwargs["in_chans"] = first.in_channels
    spec = {"source": "timm", "name": arch, "kwargs": kwargs}
    try:
        with torch.device("meta"):
            rebuilt = build_model(arch, source="timm", **kwargs)
        share_plan = get_plan(model)
        if share_plan is not None and get_plan(rebuilt) != share_plan:
            apply(rebuilt, plan=share_plan)
        same = _shapes(rebuilt) == _shapes(model)
    except ShareError:
        same = False
    if not same:
        call = ", ".join([repr(arch), *(f"{k}={v!r}" for k, v in kwargs.items()), "..."])
        raise FileFormatError(
            f"{name}: save cannot record how to rebuild this model: timm.create_model({repr(arch)}) with the "
            f"arguments read back from it ({kwargs}) builds another architecture, so load could not rebuild it. "
            f"Build it with share_transform.build_model({call}), which records its arguments, or save its "
            "state_dict and read it back with share_transform.load_checkpoint into a model you build"
        )
    return spec


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    input_size: Sequence[int] | None = None,
) -> Path:
    """Write ``model`` to a safetensors file, each shared weight once, atomically.

    The file records how to rebuild the model (when :func:`share_transform.build_model` built it, or
    ``timm.create_model`` did and its name and class count rebuild it: ``sharesnet*`` and other timm
    models), its policy and share plan (when :func:`share_transform.apply` tied it) and the aliases of its
    shared weights, so :func:`load` returns an equal, tied model. Any other module is written without a
    build record: :func:`share_transform.load_checkpoint` reads it into a model you build. An existing file at
    ``path`` is replaced atomically (readers never see a partial file; on failure nothing is left behind).

    Args:
        model: any module; shared or not.
        path: output file (``.safetensors`` by convention).
        metadata: extra ``str -> str`` entries for the header (e.g. ``{"epoch": "90"}``); keys
            ``format`` and ``sharetx.*`` are reserved. :func:`read_info` returns them as ``user``.
        input_size: ``(C, H, W)`` the model was trained or is meant to run at (a recipe's ``--img-size``);
            ``sharetx inspect`` shows it and ``sharetx export`` uses it. Default: the plan's input size.

    Returns:
        The path written.

    Raises:
        NotAModuleError; FileFormatError for bad metadata, build kwargs outside
        :data:`share_transform.build.MODEL_KWARGS` (``load`` would refuse them), or a timm model whose
        architecture cannot be rebuilt from its name; InputSizeError for a bad ``input_size``;
        MetaTensorError for a tensor without data; OutputExistsError when ``path`` is not a regular file;
        OSError when the directory cannot be written.

    Example:
        >>> model = share_transform.apply(share_transform.build_model("resnet152"))
        >>> share_transform.save(model, "resnet152-share.safetensors")  # 147 MB instead of 241 MB
    """
    model = check_model(model)
    name = model_name(model)
    header = {"format": "pt", KEY_FILE_VERSION: FILE_VERSION, KEY_VERSION: __version__}
    header.update(_check_user_metadata(metadata, name))
    spec = build_spec(model) or _timm_build(model, name)
    if spec is not None:
        # Only what ``load`` accepts back: a file that records other arguments would not load.
        check_model_kwargs(spec["kwargs"], where=f"{name}: save", error=FileFormatError)
        header[KEY_BUILD] = json.dumps(spec, sort_keys=True)
    share_plan = get_plan(model)
    if share_plan is not None:
        header[KEY_POLICY] = share_plan.policy
        header[KEY_PLAN] = json.dumps(share_plan.to_dict(), separators=(",", ":"))
    if input_size is not None:
        header[KEY_INPUT_SIZE] = json.dumps(list(check_input_size(input_size, name)))
    tensors, aliases = _unique_state(model)
    header[KEY_ALIASES] = json.dumps(aliases, separators=(",", ":"))
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise MetaTensorError(
                f"{name}: {key} has no data (meta device); materialise the model first, e.g. "
                "model.to_empty(device='cpu') then share_transform.retie(model) and load weights"
            )
    _storable(tensors, name)
    try:  # the reader's own schema: save never writes a header that read_info refuses
        parse_header(header, {k: (str(t.dtype), tuple(t.shape)) for k, t in tensors.items()})
    except SchemaError as e:
        raise FileFormatError(f"{name}: save would write a header that load refuses: {e}") from None
    return atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, header))


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, its I/O failures (a full disk) raised as the ``OSError`` they are.

    :func:`save` calls it inside :func:`share_transform.fs.atomic_write`, whose private temporary directory
    holds the library's own temporary file too, so a kill leaves one thing behind, named for the destination.
    """
    try:
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        match = _OS_ERROR.search(str(e))
        if match is None:
            raise
        errno = int(match.group(1))
        raise OSError(errno, os.strerror(errno), path) from None


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FileInfo:
    """What a ShaResNet file holds, read from its header alone (no tensor data is read)."""

    path: Path
    file_bytes: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # stored name -> (safetensors dtype code, shape)
    aliases: dict[str, str]  # alias -> stored name
    build: dict[str, Any] | None  # {"source", "name", "kwargs"}; None when the model was built elsewhere
    policy: str | None
    plan: SharePlan | None
    version: str | None  # share_transform version that wrote it; None for a foreign safetensors file
    user: dict[str, str] = field(default_factory=dict)  # the ``metadata`` given to ``save``
    #: The input size ``save(input_size=...)`` recorded, else the plan's; None when neither is known.
    input_size: tuple[int, int, int] | None = None

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


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """True when the safetensors library reads ``path``'s header (the tensors are not read)."""
    try:
        with safe_open(str(path), "pt"):
            return True
    except SafetensorError:
        return False


def _invalid(path: Path, error: Exception) -> FileFormatError:
    reason = str(error).removeprefix("Error while deserializing header: ")
    return FileFormatError(f"{path}: not a valid safetensors file ({reason})")


def read_info(path: str | os.PathLike[str]) -> FileInfo:
    """Read a safetensors file's header: its tensors, aliases, build record, plan, input size and user metadata.

    The safetensors library reads the header (at most 100 MB; the tensors must tile the bytes after it
    exactly); share_transform's entries are then checked by one schema (:mod:`share_transform.header`):
    types, ranges and depth, the share plan against the stored tensors, and a build record that names an
    architecture and only the constructor arguments in :data:`share_transform.build.MODEL_KWARGS`, so nothing
    in a file can make ``load`` read another file or allocate what the file does not hold.

    Raises:
        MissingFileError; FileFormatError for a file that is not safetensors, is truncated or corrupt, or
        whose share_transform metadata is malformed, contradicts its tensors or names a refused constructor
        argument.
    """
    path = existing_file(path, "file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
            for key in f.keys():
                part = f.get_slice(key)
                tensors[key] = (part.get_dtype(), tuple(part.get_shape()))
    except SafetensorError as e:
        raise _invalid(path, e) from None
    try:
        header = parse_header(metadata, tensors)
    except SchemaError as e:
        raise FileFormatError(f"{path}: {e}; the file is corrupt or was not written by share_transform") from None
    return FileInfo(
        path=path,
        file_bytes=path.stat().st_size,
        tensors=tensors,
        aliases=header.aliases,
        build=header.build,
        policy=header.policy,
        plan=header.plan,
        version=header.version,
        user=header.user,
        input_size=header.input_size or (header.plan.input_size if header.plan is not None else None),
    )


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file on the CPU, a ShaResNet file's aliases expanded (each gets its stored
    tensor)."""
    info = read_info(path)
    try:
        state = safetensors.torch.load_file(str(info.path))
    except (SafetensorError, RuntimeError, KeyError) as e:  # a dtype or shape torch cannot hold
        raise FileFormatError(f"{info.path}: its tensors cannot be read ({e})") from None
    for alias, stored in info.aliases.items():
        state[alias] = state[stored]
    return state


def _dtype_kind(code: str) -> str:
    """What kind of number a safetensors dtype code holds (``F32``, ``BF16``, ``I64``, ``U8``, ``BOOL``...)."""
    if code == "BOOL":
        return "bool"
    if code.startswith(("F", "BF")):
        return "floating"
    return "complex" if code.startswith("C") else "integer"


def _torch_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else "integer"


def _check_fits(model: nn.Module, info: FileInfo) -> None:
    """Every name, shape and dtype kind of the file's header, its aliases and its counts fit ``model``."""
    own = state_tensors(model)
    shapes = {k: shape for k, (_, shape) in info.tensors.items()}
    shapes.update({alias: shapes[stored] for alias, stored in info.aliases.items()})
    check_state_fits(str(info.path), model, shapes, own)
    kinds = [
        f"{k} ({dtype} in the file, {own[k].dtype} in the model)"
        for k, (dtype, _) in info.tensors.items()
        if _dtype_kind(dtype) != _torch_kind(own[k].dtype)
    ]
    if kinds:
        raise CheckpointError(f"{info.path} does not fit {model_name(model)}: dtype mismatch at {', '.join(kinds[:3])}")
    # An alias is a tie the rebuilt model has; one naming another tensor of the same shape would overwrite it.
    for alias, stored in info.aliases.items():
        if own[alias] is not own[stored]:
            raise CheckpointError(
                f"{info.path}: its header makes {alias} an alias of {stored}, which {model_name(model)} (tied by "
                "the recorded plan) holds as two tensors; the file is corrupt"
            )
    distinct = {id(t): t.numel() for t in own.values()}
    if sum(distinct.values()) != info.stored_numel:
        raise CheckpointError(
            f"{info.path} stores {info.stored_numel:,} elements but its recorded architecture "
            f"{model_name(model)} holds {sum(distinct.values()):,} (its weights are tied otherwise); "
            "the file is corrupt"
        )
    plan = info.plan
    if plan is not None:
        counts = (count_parameters(model), distinct_conv_weights(model))
        if counts != (plan.params_after, plan.convs_after):
            raise CheckpointError(
                f"{info.path}: its plan says {plan.params_after:,} parameters in {plan.convs_after} distinct conv "
                f"weights after sharing, but the rebuilt {model_name(model)} holds {counts[0]:,} in {counts[1]}; "
                "the file is corrupt"
            )


def _build_recorded(info: FileInfo, device: torch.device) -> nn.Module:
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


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine.

    Raises:
        DeviceError: not a device name, the meta device (it holds no data), or not here (no GPU, an index past
            the last one).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"{device!r} is not a device ({str(e).strip().splitlines()[0]})") from None
    if dev.type == "meta":
        raise DeviceError("load needs a device that holds data, not 'meta'")
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:  # torch asserts when it was built without CUDA
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeviceError(f"device {str(dev)!r} is not available on this machine ({reason})") from None
    return dev


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a ShaResNet file holds, tie it as it was saved, and load its weights.

    The header is checked first (:func:`read_info`: the schema, the plan against the stored tensors, only the
    constructor arguments of :data:`share_transform.build.MODEL_KWARGS`; nothing is downloaded or read but
    this file). The model is built on the meta device and tied with the recorded plan; every tensor name,
    shape, dtype kind, alias (a tie the rebuilt model has) and the total element and parameter counts are
    compared with the file's header; only then is the model materialised on ``device`` (no random init),
    re-tied (so ``get_plan``, ``retie`` and ``is_tied`` work) and every tensor copied in, one at a time. The
    module is returned in training mode, as built.

    Raises:
        MissingFileError; DeviceError for a device this machine lacks; FileFormatError for a file that is not
        safetensors, is truncated or corrupt, names a refused constructor argument, or does not say how to
        build its model (then build it yourself and use :func:`load_checkpoint`); CheckpointError when the
        tensors do not fit the recorded architecture.

    Example:
        >>> model = share_transform.load("resnet152-share.safetensors")
        >>> share_transform.count_parameters(model)
        36821032
    """
    dev = check_device(device)
    info = read_info(path)
    path = info.path
    if info.build is None:
        raise FileFormatError(
            f"{path}: the file does not record how to build its model (it was not saved by "
            "share_transform.save from a model made by build_model or timm); build the model yourself and call "
            "share_transform.load_checkpoint(model, path)"
        )
    model = _build_recorded(info, dev)
    own = state_tensors(model)
    with safe_open(str(path), "pt") as f, torch.no_grad():
        for name in info.tensors:
            try:
                tensor = f.get_tensor(name)
            except (SafetensorError, RuntimeError, KeyError) as e:  # a dtype torch cannot hold
                raise FileFormatError(f"{path}: {name} cannot be read ({e})") from None
            own[name].copy_(tensor)
    if info.plan is not None and not is_tied(model):
        raise FileFormatError(f"{path}: the rebuilt model is not tied as the recorded plan says")
    return model
