"""Residual blocks and the layers of their residual branches, found on a shape-annotated fx graph.

A residual block is the subgraph between a block input and the ``add`` that joins the residual branch to
the shortcut (ShaResNet paper, section 3; docs/design.md, The sharing rule). The block input is found as the add's
immediate dominator: every path from the model input to the add passes through it, whatever the
shortcut is (identity, 1x1 projection, avg-pool + 1x1, pre-activation). The residual branch is the side
holding more convs; its spatial conv is the last 2-D conv with a kernel larger than 1, and its layers
(scope ``"block"``) are every ``nn.Conv2d`` and ``nn.Linear`` it calls.

Analysis only: nothing here mutates the graph's module. Each block is recorded on its ``add`` node in
``node.meta[BLOCK_KEY]``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from .signature import ConvSignature, Signature, signature_of
from .trace import SHAPE_KEY

#: ``node.meta`` key under which :func:`find_blocks` records a :class:`ResidualBlock` on each add.
BLOCK_KEY = "share_transform.block"

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


class BranchLayer(NamedTuple):
    """A conv or linear layer on a block's residual branch."""

    path: str  # module path
    signature: Signature
    resolution: tuple[int, int]  # spatial size (H, W) of its input (see layer_resolution)


class ResidualBlock(NamedTuple):
    """One residual block: its spatial conv and the layers of its residual branch."""

    name: str  # common module path of the residual branch, e.g. "layer2.1"
    spatial_conv: str | None  # module path of the spatial conv; None when the branch has none
    signature: ConvSignature | None  # the spatial conv's
    conv_input: tuple[int, int] | None  # spatial size (H, W) of the spatial conv's input
    output: tuple[int, int]  # spatial size of the block's output: delimits stages
    channels: int  # channels of the block's output: delimits stages where a dilated backbone keeps the size
    branch_convs: tuple[BranchLayer, ...] = ()  # every spatial conv of the branch, in compute order (scope "all")
    branch_layers: tuple[BranchLayer, ...] = ()  # every conv and linear layer of the branch (scope "block")


def layer_resolution(layer: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The spatial size a layer works at, from its input's shape: (H, W) of a conv's NCHW input; for a linear
    layer, the dimensions between the batch and the features (H, W of a channels-last map, as ConvNeXt's MLP
    sees it), padded with 1s in front: (1, 1) for a pooled ``(N, C)`` input."""
    if isinstance(layer, nn.Conv2d):
        return (input_shape[2], input_shape[3]) if len(input_shape) == 4 else None
    if len(input_shape) < 2 or len(input_shape) > 4:
        return None
    h, w = (1, 1, *input_shape[1:-1])[-2:]
    return (h, w)


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _ADD_FUNCTIONS
    return n.op == "call_method" and n.target in _ADD_METHODS


def _shape(n: object) -> tuple[int, ...] | None:
    meta = n.meta.get(SHAPE_KEY) if isinstance(n, fx.Node) else None
    return meta.shape if meta is not None else None


def _immediate_dominators(graph: fx.Graph) -> tuple[dict[fx.Node, fx.Node | None], dict[fx.Node, int]]:
    """Immediate dominator of every node that depends on a model input (None = the virtual entry).

    Nodes come in topological order, so one pass of the Cooper-Harvey-Kennedy intersection suffices.
    Constants (``get_attr``, literals) are ignored: a layer-scale gamma must not pull the dominator of a
    block up to the entry.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    idom: dict[fx.Node, fx.Node | None] = {}

    def intersect(a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        while a is not b:
            if a is None or b is None:
                return None
            if order[a] > order[b]:
                a = idom[a]
            else:
                b = idom[b]
        return a

    for n in graph.nodes:
        if n.op == "placeholder":
            idom[n] = None
            continue
        preds = [p for p in n.all_input_nodes if p in idom]
        if not preds:
            continue
        dom: fx.Node | None = preds[0]
        for p in preds[1:]:
            dom = intersect(dom, p)
        idom[n] = dom
    return idom, order


def _branch(start: fx.Node, block_input: fx.Node | None) -> set[fx.Node]:
    """Nodes between ``block_input`` (exclusive) and ``start`` (inclusive), walking inputs backwards."""
    if start is block_input:
        return set()
    seen = {start}
    stack = [start]
    while stack:
        for p in stack.pop().all_input_nodes:
            if p is not block_input and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _path(n: fx.Node) -> str:
    """The module path a ``call_module`` node calls (fx types every target as ``str | Callable``)."""
    return str(n.target)


def _conv_nodes(nodes: Iterable[fx.Node], modules: dict[str, nn.Module]) -> list[fx.Node]:
    return [n for n in nodes if n.op == "call_module" and isinstance(modules.get(_path(n)), nn.Conv2d)]


def _layer_nodes(nodes: Iterable[fx.Node], modules: dict[str, nn.Module]) -> list[fx.Node]:
    """Calls of layers that may share at scope "block": ``nn.Conv2d`` and ``nn.Linear`` (and subclasses)."""
    return [n for n in nodes if n.op == "call_module" and isinstance(modules.get(_path(n)), nn.Conv2d | nn.Linear)]


def _branch_layer(n: fx.Node, modules: dict[str, nn.Module]) -> BranchLayer | None:
    """The layer a call node runs, with its signature and input resolution (None when its input has no shape)."""
    module = modules[_path(n)]
    shape = _shape(n.args[0]) if n.args else None
    resolution = layer_resolution(module, shape) if shape is not None else None
    signature = signature_of(module)
    if resolution is None or signature is None:
        return None
    return BranchLayer(_path(n), signature, resolution)


def _branch_layers(nodes: Iterable[fx.Node], modules: dict[str, nn.Module]) -> tuple[BranchLayer, ...]:
    return tuple(c for c in (_branch_layer(n, modules) for n in nodes) if c is not None)


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    return ".".join(common)


def find_blocks(graph: fx.Graph, model: nn.Module) -> list[ResidualBlock]:
    """Residual blocks with a conv or linear layer on their residual branch, in the order the graph computes them.

    ``graph`` must carry shapes from :func:`share_transform.trace.propagate_shapes`. A join whose dominator is
    not one feature map (Res2Net's hierarchical adds inside a block, whose dominator is a ``split``) is not a
    residual block. A block whose branch holds no spatial conv has ``spatial_conv`` None: only scope
    ``"block"`` shares its layers.
    """
    modules = dict(model.named_modules())
    idom, order = _immediate_dominators(graph)
    blocks: list[ResidualBlock] = []
    for add in graph.nodes:
        if not _is_add(add) or add not in idom or len(add.args) < 2:
            continue
        lhs, rhs = add.args[0], add.args[1]
        if not (isinstance(lhs, fx.Node) and isinstance(rhs, fx.Node)):
            continue
        out_shape = _shape(add)
        # A residual join adds two whole feature maps; broadcast adds (global-context terms) are not one.
        if out_shape is None or len(out_shape) != 4 or _shape(lhs) != out_shape or _shape(rhs) != out_shape:
            continue
        block_input = idom[add]
        if block_input is not None and _shape(block_input) is None:
            continue  # the paths meet at a tuple (a split), not at a block input
        branches = [_branch(arg, block_input) for arg in (lhs, rhs)]
        convs = [_conv_nodes(b, modules) for b in branches]
        layers = [_layer_nodes(b, modules) for b in branches]
        residual = max(range(2), key=lambda i: (len(convs[i]), len(layers[i]), len(branches[i])))
        spatial = sorted((n for n in convs[residual] if max(modules[_path(n)].kernel_size) > 1), key=order.__getitem__)
        branch_convs = _branch_layers(spatial, modules)
        branch_layers = _branch_layers(sorted(layers[residual], key=order.__getitem__), modules)
        last = spatial[-1] if spatial else None
        conv_in = _shape(last.args[0]) if last is not None else None
        if conv_in is not None and len(conv_in) != 4:
            conv_in = None
        if last is not None and conv_in is None:
            continue  # a spatial conv whose input has no known size: as before, not a block
        if last is None and not branch_layers:
            continue
        paths = sorted(_path(n) for n in branches[residual] if n.op == "call_module")
        block = ResidualBlock(
            name=_common_path(paths) or add.name,
            spatial_conv=_path(last) if last is not None else None,
            signature=ConvSignature.of(modules[_path(last)]) if last is not None else None,
            conv_input=(conv_in[2], conv_in[3]) if conv_in is not None else None,
            output=(out_shape[2], out_shape[3]),
            channels=out_shape[1],
            branch_convs=branch_convs,
            branch_layers=branch_layers,
        )
        add.meta[BLOCK_KEY] = block
        blocks.append(block)
    return blocks


def lost_reductions(graph: fx.Graph, model: nn.Module) -> list[str]:
    """Strided convs whose input is already 1 pixel wide or high: the input is too small to tell stages apart."""
    modules = dict(model.named_modules())
    lost = []
    for n in _conv_nodes(graph.nodes, modules):
        conv = modules[_path(n)]
        shape = _shape(n.args[0]) if n.args else None
        if (
            shape is not None
            and len(shape) == 4
            and any(stride > 1 and size == 1 for stride, size in zip(conv.stride, shape[2:]))
        ):
            lost.append(_path(n))
    return lost
