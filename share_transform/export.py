"""ONNX export of a ShaResNet in which each shared weight is one initializer, checked before it is kept.

A ShaResNet is meant for low-memory deployment (Boulch, arXiv 1702.08782), so the exported graph must keep
the sharing: every member conv of a share group reads the same initializer, and the ONNX file shrinks by
the parameter ratio. :func:`export_onnx` exports with ``torch.onnx.export`` (the ``torch.export``-based
exporter, which lifts a parameter once however many modules hold it), then verifies before the file
appears at its path:

* the number of distinct Conv weight initializers equals the model's distinct conv weights;
* onnxruntime's output matches PyTorch's on a random batch within ``atol`` (1e-4 by default) times the largest
  output magnitude when that exceeds 1 (float32 rounding grows with the values: randomly initialised deep nets
  give logits in the tens).

A soft-shared model (``templates=k``) is exported with each member's effective weight baked in, one
initializer per member: ONNX has no parametrization, so soft sharing saves parameters in training and in the
safetensors file, not in the ONNX graph.

Exporting needs the ``onnx``, ``onnxruntime`` and ``onnxscript`` packages.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError, InputSizeError
from .fs import atomic_write
from .modelinfo import check_input_size, check_model, default_input_size, distinct_conv_weights, model_name
from .soft import bake, is_soft
from .tie import get_plan
from .trace import eval_mode

__all__ = ["OnnxExport", "export_onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how it checked it."""

    path: Path
    file_bytes: int
    input_size: tuple[int, int, int]
    opset: int
    conv_nodes: int  # Conv nodes in the graph
    conv_weight_initializers: int  # distinct initializers the Conv nodes read their weight from
    distinct_conv_weights: int  # distinct nn.Conv2d weights of the exported (baked) PyTorch model
    max_abs_diff: float  # onnxruntime vs PyTorch on the check batch
    baked_convs: int = (
        0  # soft-shared layers (convs, linear) exported with their effective weight, one initializer each
    )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["input_size"] = list(self.input_size)
        return d

    def __str__(self) -> str:
        return (
            f"wrote {self.path} ({self.file_bytes:,} bytes, opset {self.opset}): {self.conv_nodes} Conv nodes read "
            f"{self.conv_weight_initializers} weight initializers (the model has {self.distinct_conv_weights} "
            f"distinct conv weights); onnxruntime matches PyTorch within {self.max_abs_diff:.1e}"
            + (f"; {self.baked_convs} soft-shared convs were baked into their own weights" if self.baked_convs else "")
        )


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({e}); pip install 'share-transform[onnx]'"
        ) from None
    return onnx, onnxruntime


def _conv_weight_initializers(graph: Any, name: str) -> tuple[int, int]:
    """(Conv nodes, distinct initializers feeding their weight input); every weight must be an initializer."""
    initializers = {i.name for i in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    computed = sorted({w for w in weights if w not in initializers})
    if computed:
        raise ExportError(
            f"{name}: the exported graph computes Conv weights {', '.join(computed[:3])} instead of reading "
            "initializers, so sharing cannot be checked"
        )
    return len(weights), len(set(weights))


_LAYER_ERRORS = (RuntimeError, ValueError, AssertionError, TypeError)  # what a layer raises on a wrong shape


def _runs(model: nn.Module, x: torch.Tensor) -> BaseException | None:
    """The exception ``model(x)`` raises (eval mode, no grad), or None when it runs."""
    with eval_mode(model), torch.no_grad():
        try:
            model(x)
        except _LAYER_ERRORS as e:
            return e
    return None


def _check_size(model: nn.Module, example: torch.Tensor, default: tuple[int, int, int], name: str) -> None:
    """Raise InputSizeError when the model refuses ``example``'s size but runs at its own, before the exporter
    (whose failure would read as an exporter bug, after pages of its own log) sees it. A model that fails at its
    own size too is left to the exporter, whose ExportError says so."""
    error = _runs(model, example)
    size = tuple(example.shape[1:])
    if error is None or size == default or _runs(model, example.new_zeros(1, *default)) is not None:
        return
    text = str(error).strip()
    raise InputSizeError(
        f"{name}: the model rejects input size {'x'.join(map(str, size))} "
        f"({text.splitlines()[0] if text else type(error).__name__}); it runs at "
        f"{'x'.join(map(str, default))}, give the input size it was built for"
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: Sequence[int] | None = None,
    atol: float = 1e-4,
    opset: int | None = None,
    seed: int = 0,
) -> OnnxExport:
    """Export ``model`` to ONNX at ``path`` with each shared weight as one initializer, and check it.

    The model is exported in eval mode (its mode is restored afterwards) with a dynamic batch dimension,
    input ``"input"`` of shape ``(N, *input_size)`` and output ``"output"``. The file is written atomically:
    it appears at ``path`` only once both checks pass, and an existing file is replaced.

    Args:
        model: a module, shared by :func:`share_transform.apply` or not.
        path: the ``.onnx`` file to write (weights inside it, no external data file).
        input_size: ``(C, H, W)``; defaults to the recorded plan's, else the model's own (3x224x224).
        atol: the largest difference allowed between onnxruntime and PyTorch outputs, absolute for outputs within
            [-1, 1], relative to the largest output magnitude beyond.
        opset: ONNX opset; the exporter's default when None.
        seed: seed of the random check inputs.

    Returns:
        An :class:`OnnxExport` with the file size, the Conv weight initializer count and the difference.

    Raises:
        ExportError: the exporter failed, a Conv weight is not an initializer, the initializers do not
            match the model's distinct conv weights, or onnxruntime's output differs by more than ``atol``.
        InputSizeError: ``input_size`` is not three positive integers, is past
            :data:`share_transform.modelinfo.MAX_INPUT_PIXELS`, or the model refuses it.

    Example:
        >>> model = share_transform.load("resnet50-share.safetensors")
        >>> print(export_onnx(model, "resnet50-share.onnx"))
    """
    model = check_model(model)
    name = model_name(model)
    onnx, ort = _onnx_modules()
    recorded = get_plan(model)
    baked = sum(isinstance(m, nn.Conv2d | nn.Linear) and is_soft(m) for m in model.modules())
    if baked:
        model = bake(copy.deepcopy(model))  # the caller's model keeps its templates
    own = recorded.input_size if recorded is not None else default_input_size(model)
    size = check_input_size(own if input_size is None else input_size, name)  # bounded: a header gives the default
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *size, generator=generator).to(device)
    check = torch.randn(3, *size, generator=generator).to(device)  # another batch size: the axis is dynamic
    _check_size(model, example, own, name)
    expected_convs = distinct_conv_weights(model)
    result: dict[str, Any] = {}

    def write(tmp: str) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes are not for users
                torch.onnx.export(
                    model,
                    (example,),
                    tmp,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                )
        except Exception as e:  # the exporter raises many types; report them as one
            raise ExportError(f"{name}: torch.onnx.export failed: {str(e).strip().splitlines()[0]}") from e
        proto = onnx.load(tmp)
        conv_nodes, conv_inits = _conv_weight_initializers(proto.graph, name)
        if conv_inits != expected_convs:
            raise ExportError(
                f"{name}: the ONNX graph has {conv_inits} Conv weight initializers but the model has "
                f"{expected_convs} distinct conv weights; the exporter did not keep the sharing"
            )
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            reference = model(check).float().cpu().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: check.cpu().numpy()})[0]
        diff = float(abs(got - reference).max())
        allowed = atol * max(1.0, float(abs(reference).max()))
        if not diff <= allowed:  # also catches NaN
            raise ExportError(f"{name}: onnxruntime differs from PyTorch by {diff:.3g} (> {allowed:.3g})")
        opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
        result.update(
            opset=opsets[0] if opsets else 0,
            conv_nodes=conv_nodes,
            conv_weight_initializers=conv_inits,
            max_abs_diff=diff,
        )

    with eval_mode(model):  # restores every submodule's own flag (a frozen BatchNorm stays in eval)
        written = atomic_write(path, write)
    return OnnxExport(
        path=written,
        file_bytes=written.stat().st_size,
        input_size=size,
        distinct_conv_weights=expected_convs,
        baked_convs=baked,
        **result,
    )
