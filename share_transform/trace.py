"""Tracing and shape propagation: the first two steps of the ShaResNet pass.

``trace_model`` turns a model into a ``torch.fx.Graph`` in which every ``nn.Conv2d`` (and every subclass,
such as timm's ``StdConv2d``) stays one ``call_module`` node, so the later steps can read the conv's
hyper-parameters from the module. ``propagate_shapes`` runs the graph on meta tensors (no compute, no
memory for activations) and records each node's output shape in ``node.meta[SHAPE_KEY]``: the layers a
ResNet is made of by closed-form shape rules, functions (additions, flattening) by torch's meta kernels,
and only what neither covers (a layer without a rule, an op that mixes in the model's own tensors) on
fake tensors, whose dispatcher costs about 18 times a meta tensor's.

Both steps run with eval semantics and leave the model exactly as they found it: its parameters, buffers
and the train/eval flag of every submodule.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorConverter, FakeTensorMode
from torch.utils._pytree import tree_map

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


def trace_model(model: nn.Module, name: str, *, leaves: tuple[type[nn.Module], ...] = ()) -> fx.Graph:
    """Symbolically trace ``model`` with every ``nn.Conv2d`` (and every module of a type in ``leaves``) kept as a
    leaf.

    Plain tracing is tried first; when it fails (timm's ``*_clip`` attention pools, for instance) it is
    retried with timm's registry of untraceable modules and functions as leaves.

    Raises:
        TraceError: neither attempt could trace the model.
    """
    attempts: list[tuple[tuple[type[nn.Module], ...], list[Any]]] = [(leaves, [])]
    leaf_types, functions = _timm_notrace()
    if leaf_types or functions:
        attempts.append((leaves + leaf_types, functions))
    errors: list[str] = []
    with eval_mode(model):
        for leaf, autowrap in attempts:
            tracer = _ConvLeafTracer(leaf, autowrap)
            try:
                return tracer.trace(model)
            except Exception as exc:  # fx raises many types (TraceError, TypeError, AssertionError...)
                errors.append(f"{type(exc).__name__}: {_first_line(exc)}")
            finally:
                # fx's trace leaves the tracer in a reference cycle (a recursive closure), holding the model
                # and a dict of its tensors until the garbage collector runs; drop them now.
                vars(tracer).clear()
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


def _pool2d_shape(pool: nn.MaxPool2d | nn.AvgPool2d, shape: torch.Size) -> tuple[int, ...] | None:
    if len(shape) != 4 or pool.ceil_mode or (isinstance(pool, nn.MaxPool2d) and pool.dilation != 1):
        return None
    k, s, p = (
        torch.nn.modules.utils._pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding)
    )
    return (shape[0], shape[1], *((shape[2 + i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2)))


def _adaptive_pool2d_shape(
    pool: nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d, shape: torch.Size
) -> tuple[int, ...] | None:
    size = torch.nn.modules.utils._pair(pool.output_size)
    if len(shape) != 4 or None in size:
        return None
    return (shape[0], shape[1], *size)


def _linear_shape(linear: nn.Linear, shape: torch.Size) -> tuple[int, ...] | None:
    return (*shape[:-1], linear.out_features) if shape and shape[-1] == linear.in_features else None


def _flatten_shape(flatten: nn.Flatten, shape: torch.Size) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta").flatten(flatten.start_dim, flatten.end_dim).shape)


# Closed-form shape rules for the layers a ResNet is made of, keyed by exact type: no tensor dispatch at all
# (and none of them may run on meta inputs with the model's real weights). Subclasses (timm's Conv2dSame pads
# at run time) take the generic path. A rule returns None for a case it does not cover.
_SHAPE_RULES: dict[type[nn.Module], Any] = {
    nn.Conv2d: _conv2d_shape,
    nn.MaxPool2d: _pool2d_shape,
    nn.AvgPool2d: _pool2d_shape,
    nn.AdaptiveAvgPool2d: _adaptive_pool2d_shape,
    nn.AdaptiveMaxPool2d: _adaptive_pool2d_shape,
    nn.Linear: _linear_shape,
    nn.Flatten: _flatten_shape,
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


#: Elementwise functions whose output shape is the broadcast of their operands' (the residual addition):
#: their meta kernels are Python reference implementations, slower than a shape rule by far.
_ELEMENTWISE = frozenset({operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul})


def _elementwise_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    if kwargs or len(args) != 2 or not all(isinstance(a, torch.Tensor | int | float) for a in args):
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.device.type != "meta" or t.dtype != tensors[0].dtype for t in tensors):
        return None
    return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))


def _meta_like(t: Any, device: torch.device | str = "meta") -> Any:
    """A tensor of ``t``'s shape, strides and dtype on ``device``, holding no data; anything else as is."""
    if isinstance(t, torch.Tensor):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return t


class _MetaShapeInterpreter(fx.Interpreter):
    """Runs a graph on meta tensors and records each node's output shape.

    A module with a shape rule becomes an empty meta tensor of the rule's shape. Everything else runs on
    meta tensors, and where that fails (a module's own weights live on the CPU, a layer without a rule)
    on fake tensors on the model's device, turned back into meta tensors after.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, device: torch.device):
        super().__init__(model, graph=graph, garbage_collect_values=True)
        self._device = device
        self._fake_mode: FakeTensorMode | None = None

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        rule = _SHAPE_RULES.get(type(module))
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            shape = rule(module, args[0].shape)
            if shape is not None:
                return torch.empty(shape, dtype=args[0].dtype, device="meta")
        return self._meta_or_fake(super().call_module, target, args, kwargs)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if target in _ELEMENTWISE:
            shape = _elementwise_shape(args, kwargs)
            if shape is not None:
                return torch.empty(
                    shape, dtype=args[0].dtype if isinstance(args[0], torch.Tensor) else args[1].dtype, device="meta"
                )
        return self._meta_or_fake(super().call_function, target, args, kwargs)

    def call_method(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._meta_or_fake(super().call_method, target, args, kwargs)

    def _meta_or_fake(self, run: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return run(target, args, kwargs)
        except Exception:  # a meta kernel refuses (mixed devices, no meta kernel): take the fake path
            pass
        if self._fake_mode is None:
            self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self._fake_mode:
            fake_args, fake_kwargs = tree_map(lambda t: _meta_like(t, self._device), (args, kwargs))
            out = run(target, fake_args, fake_kwargs)
        return tree_map(_meta_like, out)

    def drop_fake_memo(self) -> None:
        """Forget the parameters the fake path saw.

        Fake dispatch leaves the mode in reference cycles, and its converter's memo holds weak references to
        the parameters it converted until the garbage collector runs: torch.utils.swap_tensors (``.half()``
        under set_swap_module_params_on_conversion) refuses such tensors.
        """
        if self._fake_mode is not None:
            self._fake_mode.fake_tensor_converter = FakeTensorConverter()

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE_KEY] = ShapeMeta(tuple(int(s) for s in result.shape))
        return result


def propagate_shapes(model: nn.Module, graph: fx.Graph, input_size: tuple[int, int, int], name: str) -> None:
    """Record ``ShapeMeta`` on every tensor-valued node of ``graph`` for an input of ``input_size``.

    Runs on meta tensors (fake ones where needed, see :class:`_MetaShapeInterpreter`) in eval mode with a
    batch of 2 (a batch of 1 trips some models' squeezes).

    Raises:
        InputSizeError: the model rejected ``input_size``.
    """
    param = next(model.parameters(), None)
    x = torch.empty((2, *input_size), device="meta")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # Models whose forward takes optional extra arguments get their defaults.
    args = [x] + [p.args[0] if p.args else None for p in placeholders[1:]]
    # The fake path runs on the model's own device (meta for a model built under ``torch.device("meta")``).
    device = param.device if param is not None else torch.device("cpu")
    interpreter = _MetaShapeInterpreter(model, graph, device)
    try:
        with eval_mode(model), torch.no_grad():
            interpreter.run(*args)
    except Exception as exc:
        size = "x".join(str(s) for s in input_size)
        raise InputSizeError(
            f"{name}: the model rejected input size {size} during shape propagation "
            f"({type(exc).__name__}: {_first_line(exc)}). Pass input_size=(C, H, W) that the model accepts."
        ) from exc
    finally:
        interpreter.drop_fake_memo()
