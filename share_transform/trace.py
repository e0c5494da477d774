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

A layer the closed-form rules do not know can get one with :func:`register_shape_rule`.

Who is at fault when shape propagation fails decides the error (docs/design.md, Errors): an exception raised while
the model's own code and torch's kernels run on the input (on meta tensors, then on fake ones) means the model
rejected the input size, :class:`InputSizeError`; anything else (a shape rule, registered or built in, this
module's interpreter, an operation fake tensors cannot run) is a :class:`TraceError`. Both name the graph node.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorConverter,
    FakeTensorMode,
    UnsupportedFakeTensorException,
    UnsupportedOperatorException,
)
from torch.utils._pytree import tree_map

from .errors import InputSizeError, RegistrationError, TraceError

__all__ = ["ShapeRule", "register_shape_rule"]

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


#: A closed-form shape rule: ``fn(module, input_shape) -> output_shape | None``, called with the module and the
#: shape of its one tensor input; None for a case it does not cover (the module then runs on meta or fake tensors).
ShapeRule = Callable[[Any, torch.Size], tuple[int, ...] | None]


def _conv2d_shape(conv: nn.Conv2d, shape: torch.Size) -> tuple[int, ...] | None:
    if isinstance(conv.padding, str) or len(shape) != 4 or shape[1] != conv.in_channels:
        return None
    if conv.padding_mode != "zeros" and any(conv.padding[i] >= shape[2 + i] for i in range(2)):
        return None  # reflection needs more pixels than the padding
    size = [
        (shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
        for i in range(2)
    ]
    return (shape[0], conv.out_channels, *size) if min(size) > 0 else None  # else the kernel raises


def _same_shape(module: nn.Module, shape: torch.Size) -> tuple[int, ...]:
    return tuple(shape)


def _batchnorm2d_shape(bn: nn.BatchNorm2d, shape: torch.Size) -> tuple[int, ...] | None:
    return tuple(shape) if len(shape) == 4 and shape[1] == bn.num_features else None


def _pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """One spatial output size of a pooling layer, as torch's ``pooling_output_shape``: with ``ceil_mode`` the
    last window may start in the padding on the right but not beyond it."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool2d_shape(pool: nn.MaxPool2d | nn.AvgPool2d, shape: torch.Size) -> tuple[int, ...] | None:
    if len(shape) != 4 or getattr(pool, "return_indices", False):  # indices: the module returns a pair
        return None
    pair = torch.nn.modules.utils._pair
    k, s, p = (pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding))
    d = pair(pool.dilation) if isinstance(pool, nn.MaxPool2d) else (1, 1)
    if any(p[i] > k[i] // 2 for i in range(2)):
        return None  # torch refuses padding over half the kernel (the undilated one)
    size = [_pooled_size(shape[2 + i], k[i], s[i], p[i], d[i], pool.ceil_mode) for i in range(2)]
    return (shape[0], shape[1], *size) if min(size) > 0 else None


def _adaptive_pool2d_shape(
    pool: nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d, shape: torch.Size
) -> tuple[int, ...] | None:
    size = torch.nn.modules.utils._pair(pool.output_size)
    if len(shape) != 4 or None in size or getattr(pool, "return_indices", False) or 0 in shape[2:]:
        return None
    return (shape[0], shape[1], *size)


def _linear_shape(linear: nn.Linear, shape: torch.Size) -> tuple[int, ...] | None:
    return (*shape[:-1], linear.out_features) if shape and shape[-1] == linear.in_features else None


def _flatten_shape(flatten: nn.Flatten, shape: torch.Size) -> tuple[int, ...] | None:
    n = len(shape)
    start, end = (d + n if d < 0 else d for d in (flatten.start_dim, flatten.end_dim))
    if not 0 <= start <= end < n:
        return None
    return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])


# Closed-form shape rules for the layers a ResNet is made of, keyed by exact type: no tensor dispatch at all
# (and none of them may run on meta inputs with the model's real weights). Subclasses (timm's Conv2dSame pads
# at run time) take the generic path. A rule returns None for a case it does not cover, among them every input
# the layer itself would refuse, so that the layer raises its own error.
_SHAPE_RULES: dict[type[nn.Module], ShapeRule] = {
    nn.Conv2d: _conv2d_shape,
    nn.BatchNorm2d: _batchnorm2d_shape,
    nn.MaxPool2d: _pool2d_shape,
    nn.AvgPool2d: _pool2d_shape,
    nn.AdaptiveAvgPool2d: _adaptive_pool2d_shape,
    nn.AdaptiveMaxPool2d: _adaptive_pool2d_shape,
    nn.Linear: _linear_shape,
    nn.Flatten: _flatten_shape,
    **{
        t: _same_shape
        for t in (
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

#: The shape rules by layer class, read-only: the built-in ones and those :func:`register_shape_rule` added.
SHAPE_RULES: Mapping[type[nn.Module], ShapeRule] = MappingProxyType(_SHAPE_RULES)


def register_shape_rule(module_class: type[nn.Module], fn: ShapeRule, *, replace: bool = False) -> ShapeRule:
    """Give shape propagation a closed-form rule for ``module_class``, a layer it does not know.

    A layer without a rule still works: it runs on meta tensors, or on fake tensors where it cannot (its own
    tensors on the CPU, an op without a meta kernel), at about 18 times a meta tensor's cost; and a layer that
    fake tensors cannot run (data-dependent shapes) stops :func:`share_transform.plan` with a ``TraceError``
    naming the node. A rule removes both.

    Args:
        module_class: the layer's class; the rule applies to exactly this class, not to its subclasses.
        fn: ``fn(module, input_shape) -> output_shape | None``, called with the module and the ``torch.Size`` of
            its one tensor input (modules called with more arguments take the generic path). Return the output
            shape as a tuple of ints, or None for a case the rule does not cover, including every input the layer
            itself would refuse (so that the layer raises its own error: the model rejected the input size).
            Never run the module or touch its tensors. An exception the rule raises is a ``TraceError``.
        replace: replace the rule ``module_class`` has already.

    Returns:
        ``fn``, unchanged.

    Raises:
        RegistrationError: ``module_class`` is not an ``nn.Module`` subclass, ``fn`` is not callable, or
            ``module_class`` has a rule already and ``replace`` is False.

    Example:
        >>> class Shift(nn.Module):  # shifts the feature map one pixel: the shape does not change
        ...     def forward(self, x):
        ...         return torch.roll(x, 1, dims=-1)
        >>> register_shape_rule(Shift, lambda module, shape: tuple(shape))
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise RegistrationError(f"register_shape_rule: {module_class!r} is not a torch.nn.Module subclass")
    if not callable(fn):
        raise RegistrationError(f"register_shape_rule: the rule for {module_class.__qualname__} is not callable")
    if module_class in _SHAPE_RULES and not replace:
        raise RegistrationError(
            f"register_shape_rule: {module_class.__module__}.{module_class.__qualname__} has a shape rule already; "
            "pass replace=True to replace it"
        )
    _SHAPE_RULES[module_class] = fn
    return fn


#: Elementwise functions whose output shape is the broadcast of their operands' (the residual addition):
#: their meta kernels are Python reference implementations, slower than a shape rule by far.
_ELEMENTWISE = frozenset({operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul})


def _elementwise_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    if kwargs or len(args) != 2 or not all(isinstance(a, torch.Tensor | int | float) for a in args):
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.device.type != "meta" or t.dtype != tensors[0].dtype for t in tensors):
        return None
    try:
        return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
    except RuntimeError:  # not broadcastable: the op itself raises the model's error
        return None


#: What fake tensors cannot do (outputs whose shape depends on the data, ops without a fake implementation): a
#: limit of shape propagation, not a verdict on the input size.
_FAKE_LIMITS = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedFakeTensorException,
    UnsupportedOperatorException,
)


class _ModelRejected(Exception):
    """The model's own code or a torch kernel raised on the input: on fake tensors, after meta tensors failed."""

    def __init__(self, error: Exception, meta_error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
        self.meta_error = meta_error


class _RuleFailed(Exception):
    """A closed-form shape rule raised (or returned what is not a shape)."""

    def __init__(self, module_class: type, error: Exception) -> None:
        super().__init__(str(error))
        self.module_class = module_class
        self.error = error


def _meta_like(t: Any, device: torch.device | str = "meta") -> Any:
    """A tensor of ``t``'s shape, strides and dtype on ``device``, holding no data; anything else as is."""
    if isinstance(t, torch.Tensor):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return t


def _describe_node(n: fx.Node) -> str:
    """``layer1_0_conv1 (call_module layer1.0.conv1)``: the node's name and what it calls."""
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target))
    return f"{n.name} ({n.op} {target})"


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


class _MetaShapeInterpreter(fx.Interpreter):
    """Runs a graph on meta tensors and records each node's output shape.

    A module with a shape rule becomes an empty meta tensor of the rule's shape. Everything else runs on
    meta tensors, and where that fails (a module's own weights live on the CPU, a layer without a rule)
    on fake tensors on the model's device, turned back into meta tensors after. A node that fails raises
    :class:`InputSizeError` or :class:`TraceError` naming it (see the module docstring for which).
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, device: torch.device, name: str, size: str):
        super().__init__(model, graph=graph, garbage_collect_values=True)
        self.extra_traceback = False  # fx would append the node and a traceback to the message; the error names it
        self._device = device
        self._name = name
        self._size = size
        self._fake_mode: FakeTensorMode | None = None

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        rule = _SHAPE_RULES.get(type(module))
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            try:
                shape = rule(module, args[0].shape)
                out = None if shape is None else torch.empty(shape, dtype=args[0].dtype, device="meta")
            except Exception as exc:  # any failure of the rule is the rule's: report it as such, never as the model's
                raise _RuleFailed(type(module), exc) from exc
            if out is not None:
                return out
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
        except Exception as exc:
            # Meta tensors refuse in many ways that say nothing about the input (no meta kernel, the module's own
            # tensors on the CPU, a read of the data): the fake path decides, and the error keeps this failure.
            meta_error = exc
        if self._fake_mode is None:
            self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self._fake_mode:
            fake_args, fake_kwargs = tree_map(lambda t: _meta_like(t, self._device), (args, kwargs))
            try:
                out = run(target, fake_args, fake_kwargs)
            except _FAKE_LIMITS:
                raise  # shape propagation's limit: a TraceError
            except Exception as exc:  # the model's own code or a kernel refused the input
                raise _ModelRejected(exc, meta_error) from exc
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
        try:
            result = super().run_node(n)
        except _ModelRejected as e:
            meta = (
                ""
                if _first_line(e.meta_error) == _first_line(e.error)
                else f"; on meta tensors: {_error_text(e.meta_error)}"
            )
            raise InputSizeError(
                f"{self._name}: the model rejected input size {self._size} at node {_describe_node(n)} "
                f"({_error_text(e.error)}{meta}). Pass input_size=(C, H, W) that the model accepts."
            ) from e.error
        except _RuleFailed as e:
            rule = f"{e.module_class.__module__}.{e.module_class.__qualname__}"
            raise TraceError(
                f"{self._name}: shape propagation failed at node {_describe_node(n)}: the shape rule for {rule} "
                f"raised {_error_text(e.error)}. Fix or replace the rule (share_transform.register_shape_rule)."
            ) from e.error
        except Exception as exc:  # the interpreter, or an op fake tensors cannot run: not the input size's fault
            raise TraceError(
                f"{self._name}: shape propagation failed at node {_describe_node(n)} ({_error_text(exc)}). "
                "If fake tensors cannot run the layer, register a shape rule for it "
                "(share_transform.register_shape_rule); otherwise please report it."
            ) from exc
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE_KEY] = ShapeMeta(tuple(int(s) for s in result.shape))
        return result


def propagate_shapes(model: nn.Module, graph: fx.Graph, input_size: tuple[int, int, int], name: str) -> None:
    """Record ``ShapeMeta`` on every tensor-valued node of ``graph`` for an input of ``input_size``.

    Runs on meta tensors (fake ones where needed, see :class:`_MetaShapeInterpreter`) in eval mode with a
    batch of 2 (a batch of 1 trips some models' squeezes).

    Raises:
        InputSizeError: the model rejected ``input_size``: its own code or a torch kernel raised on it (the
            message names the node).
        TraceError: shape propagation itself failed: a shape rule raised, or fake tensors cannot run a node
            (the message names the node).
    """
    param = next(model.parameters(), None)
    x = torch.empty((2, *input_size), device="meta")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # Models whose forward takes optional extra arguments get their defaults.
    args = [x] + [p.args[0] if p.args else None for p in placeholders[1:]]
    # The fake path runs on the model's own device (meta for a model built under ``torch.device("meta")``).
    device = param.device if param is not None else torch.device("cpu")
    interpreter = _MetaShapeInterpreter(model, graph, device, name, "x".join(str(s) for s in input_size))
    try:
        with eval_mode(model), torch.no_grad():
            interpreter.run(*args)
    finally:
        interpreter.drop_fake_memo()
