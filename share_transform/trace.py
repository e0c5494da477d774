"""Tracing and shape propagation: the first two steps of the ShaResNet pass.

``trace_model`` turns a model into a ``torch.fx.Graph`` in which every ``nn.Conv2d`` (and every subclass,
such as timm's ``StdConv2d``) stays one ``call_module`` node, so the later steps can read the conv's
hyper-parameters from the module. ``propagate_shapes`` runs the graph on fake tensors (no real compute,
no memory for activations) and records each node's output shape in ``node.meta[SHAPE_KEY]``.

Both steps run with eval semantics and leave the model exactly as they found it: its parameters, buffers
and the train/eval flag of every submodule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import InputSizeError, TraceError

#: ``node.meta`` key under which :func:`propagate_shapes` records a :class:`ShapeMeta`.
SHAPE_KEY = "share_transform.shape"


class ShapeMeta(NamedTuple):
    """What shape propagation learned about one node: the shape of its tensor output."""

    shape: tuple[int, ...]


class _ConvLeafTracer(fx.Tracer):
    """A tracer that keeps every 2-D conv whole, whatever package defines it.

    The default tracer only treats modules from ``torch.nn`` as leaves, so a ``Conv2d`` subclass from
    another package (timm's ``StdConv2d``, ``Conv2dSame``) would dissolve into ``F.conv2d`` and drop out
    of the analysis.
    """

    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = (), autowrap_functions: Sequence[Any] = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Conv2d):
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], list[Any]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but keep the plain path usable without it
        return (), []
    return tuple(get_notrace_modules()), list(get_notrace_functions())


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message: fx and fake-tensor errors run to many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def trace_model(model: nn.Module, name: str) -> fx.Graph:
    """Symbolically trace ``model`` with every ``nn.Conv2d`` kept as a leaf.

    Plain tracing is tried first; when it fails (timm's ``*_clip`` attention pools, for instance) it is
    retried with timm's registry of untraceable modules and functions as leaves.

    Raises:
        TraceError: neither attempt could trace the model.
    """
    attempts: list[tuple[tuple[type[nn.Module], ...], list[Any]]] = [((), [])]
    leaf_types, functions = _timm_notrace()
    if leaf_types or functions:
        attempts.append((leaf_types, functions))
    errors: list[str] = []
    with eval_mode(model):
        for leaves, autowrap in attempts:
            try:
                return _ConvLeafTracer(leaves, autowrap).trace(model)
            except Exception as exc:  # fx raises many types (TraceError, TypeError, AssertionError...)
                errors.append(f"{type(exc).__name__}: {_first_line(exc)}")
    raise TraceError(
        f"{name}: torch.fx could not trace the model ({errors[-1]}). Register the untraceable layer "
        "with timm.layers.register_notrace_module (or register_notrace_function) and try again."
    )


def _conv2d_shape(conv: nn.Conv2d, shape: torch.Size) -> tuple[int, ...] | None:
    if isinstance(conv.padding, str) or len(shape) != 4:
        return None
    size = [
        (shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
        for i in range(2)
    ]
    return (shape[0], conv.out_channels, *size)


def _same_shape(module: nn.Module, shape: torch.Size) -> tuple[int, ...]:
    return tuple(shape)


# Shape rules for the layers a ResNet is made of, keyed by exact type: fake execution of BatchNorm goes
# through its decomposition and dominated planning time. Subclasses (timm's Conv2dSame pads at run time)
# take the generic fake-tensor path.
_SHAPE_RULES: dict[type[nn.Module], Any] = {
    nn.Conv2d: _conv2d_shape,
    **{
        t: _same_shape
        for t in (
            nn.BatchNorm2d,
            nn.ReLU,
            nn.ReLU6,
            nn.SiLU,
            nn.GELU,
            nn.Hardswish,
            nn.LeakyReLU,
            nn.ELU,
            nn.Sigmoid,
            nn.Identity,
            nn.Dropout,
            nn.Dropout2d,
        )
    },
}


class _FakeShapeInterpreter(fx.Interpreter):
    """Runs a graph on fake tensors and records each node's output shape."""

    def __init__(self, model: nn.Module, graph: fx.Graph, fake_mode: FakeTensorMode):
        super().__init__(model, graph=graph, garbage_collect_values=True)
        self._fake_mode = fake_mode

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        rule = _SHAPE_RULES.get(type(module))
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            shape = rule(module, args[0].shape)
            if shape is not None:
                return args[0].new_empty(shape)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        with self._fake_mode:
            result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE_KEY] = ShapeMeta(tuple(int(s) for s in result.shape))
        return result


def propagate_shapes(model: nn.Module, graph: fx.Graph, input_size: tuple[int, int, int], name: str) -> None:
    """Record ``ShapeMeta`` on every tensor-valued node of ``graph`` for an input of ``input_size``.

    Runs on fake tensors in eval mode with a batch of 2 (a batch of 1 trips some models' squeezes).

    Raises:
        InputSizeError: the model rejected ``input_size``.
    """
    param = next(model.parameters(), None)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        # On the model's own device (meta for a model built under ``torch.device("meta")``).
        x = torch.empty((2, *input_size), device=param.device if param is not None else "cpu")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # Models whose forward takes optional extra arguments get their defaults.
    args = [x] + [p.args[0] if p.args else None for p in placeholders[1:]]
    try:
        with eval_mode(model), torch.no_grad():
            _FakeShapeInterpreter(model, graph, fake_mode).run(*args)
    except Exception as exc:
        size = "x".join(str(s) for s in input_size)
        raise InputSizeError(
            f"{name}: the model rejected input size {size} during shape propagation "
            f"({type(exc).__name__}: {_first_line(exc)}). Pass input_size=(C, H, W) that the model accepts."
        ) from exc
