"""Warm starts from trained weights, and what sharing loses: closed forms on a group's stacked member weights.

A group's members are stacked as the rows of a matrix ``W`` (members x weight elements); each init gives every
member an approximation ``W_hat_j`` of its weight, and the relative reconstruction error of the group is
``||W - W_hat||_F / ||W||_F`` over the stacked members.

* ``"mean"``: one shared weight, the members' average: the least-squares shared weight.
* ``"mean-scaled"``: one shared weight compared per output channel up to scale. Each output channel of each
  member is normalised, the shared kernel of a channel is the principal direction of the members' normalised
  kernels (their average, when they agree up to scale), and member ``j`` is approximated by ``s_j * K`` per
  channel, ``s_j`` its least-squares scale. The scale is folded into the BatchNorm that reads the member's
  output, so the shared model computes ``BN_j(conv(x, s_j * K))``, exactly in eval mode.
* ``"svd"`` (soft groups of ``k`` templates): the best rank-``k`` approximation (Eckart-Young). With
  ``W = U S V^T``, the templates are ``S_k V_k^T`` (the top-``k`` right singular directions, each scaled by its
  singular value) and member ``j``'s coefficients are ``U[j, :k]`` (orthonormal columns, as the reference code's
  orthogonal init); the error is ``sqrt(sum of the discarded squared singular values) / ||W||``.

Everything works on weight tensors of any shape (``out, ...``), so it holds for any layer a group shares.
``recalibrate_bn`` re-estimates BatchNorm statistics after a weight change.

Example:
    >>> model = share_transform.apply(trained_resnet50, init="mean-scaled")
    >>> share_transform.get_reconstruction(model).total
    0.62
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import ShareOptionError, WarmStartError
from .trace import eval_mode, trace_model

__all__ = ["GroupReconstruction", "Reconstruction", "recalibrate_bn"]

#: Attribute under which ``apply`` records what a warm start lost (``share_transform.get_reconstruction``).
RECONSTRUCTION_ATTR = "_share_reconstruction"

#: A member channel whose least-squares scale is below this (in units of the channel's shared kernel, whose
#: norm is the members' mean norm) is approximated by zero: its output is folded into a constant.
ZERO_SCALE = 1e-7


@dataclass(frozen=True)
class GroupReconstruction:
    """What sharing loses in one group: squared Frobenius norms over its stacked members."""

    group: int  # index into the plan's groups
    members: tuple[str, ...]  # their module paths, as the plan's group lists them
    squared_error: float  # sum_j ||W_j - W_hat_j||^2
    squared_norm: float  # sum_j ||W_j||^2

    @property
    def relative(self) -> float:
        """``||W - W_hat|| / ||W||`` over the group's stacked members (0 for all-zero weights)."""
        return math.sqrt(self.squared_error / self.squared_norm) if self.squared_norm > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "members": list(self.members), "relative_error": self.relative}


@dataclass(frozen=True)
class Reconstruction:
    """The relative reconstruction error of a warm start, per group and in total.

    ``total`` is the same ratio over the members of every group together, ``sqrt(sum of squared errors / sum
    of squared norms)``: a group weighs by its members' squared norm, not as one vote.
    """

    init: str
    groups: tuple[GroupReconstruction, ...]

    @property
    def total(self) -> float:
        norm = sum(g.squared_norm for g in self.groups)
        return math.sqrt(sum(g.squared_error for g in self.groups) / norm) if norm > 0 else 0.0

    def of_members(self, members: tuple[str, ...]) -> GroupReconstruction | None:
        """The error of the group of these members, when it was measured."""
        return next((g for g in self.groups if g.members == members), None)

    def to_dict(self) -> dict[str, Any]:
        return {"init": self.init, "total": self.total, "groups": [g.to_dict() for g in self.groups]}


def stack(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The members' weights as rows ``(members, out, rest)``, in float32 at least (half precision sums badly)."""
    dtype = torch.promote_types(weights[0].dtype, torch.float32)
    return torch.stack([w.detach().reshape(w.shape[0], -1).to(dtype) for w in weights])


def _squared_norm(t: torch.Tensor) -> float:
    """``||t||^2`` of a float32 (or wider) tensor, without a float64 copy of it (the reduction is pairwise)."""
    return float(torch.linalg.vector_norm(t)) ** 2


def measure(index: int, members: tuple[str, ...], rows: torch.Tensor, approx: torch.Tensor) -> GroupReconstruction:
    """The error of ``approx`` against ``rows`` (both ``(members, ...)``)."""
    return GroupReconstruction(index, members, _squared_norm(rows - approx), _squared_norm(rows))


def mean_weight(
    index: int, members: tuple[str, ...], weights: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, GroupReconstruction]:
    """The members' average (float32 or wider) and its reconstruction error, one member at a time (no stacked
    copy of the group)."""
    dtype = torch.promote_types(weights[0].dtype, torch.float32)
    total = weights[0].detach().to(dtype, copy=True)
    for w in weights[1:]:
        total.add_(w.detach())
    mean = total.div_(len(weights))
    error = sum(_squared_norm(w.detach().to(dtype) - mean) for w in weights)
    norm = sum(_squared_norm(w.detach().to(dtype)) for w in weights)
    return mean, GroupReconstruction(index, members, error, norm)


def svd_weights(
    index: int, members: tuple[str, ...], weights: Sequence[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, GroupReconstruction]:
    """``(templates, coefficients, error)`` of the best rank-``k`` approximation of the members (see
    :func:`svd_templates`); the error is the closed form, the discarded eigenvalues of the Gram matrix (the
    squared singular values) over its trace."""
    rows = stack(weights).reshape(len(weights), -1)
    templates, coefficients, values = svd_templates(rows, k, eigenvalues=True)
    discarded = float(values[: max(len(values) - k, 0)].clamp(min=0).sum())
    return templates, coefficients, GroupReconstruction(index, members, discarded, float(values.clamp(min=0).sum()))


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows.T`` (over the last dims, batched over the leading ones), symmetric, in float64."""
    g = torch.matmul(rows, rows.transpose(-1, -2)).double()
    return (g + g.transpose(-1, -2)) / 2


def _orient(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column (dim -2 indexes the entries) so its entries sum to >= 0: a deterministic sign."""
    sign = torch.where(vectors.sum(dim=-2, keepdim=True) < 0, -1.0, 1.0).to(vectors.dtype)
    return vectors * sign


def svd_templates(rows: torch.Tensor, k: int, *, eigenvalues: bool = False) -> Any:
    """The best rank-``k`` approximation of ``rows`` (members x elements) as ``coefficients @ templates``.

    Returns ``(templates, coefficients)``: ``r = min(k, members)`` templates ``S_r V_r^T`` of shape
    ``(r, elements)`` and coefficients ``U_r`` of shape ``(members, r)`` (orthonormal columns, each oriented
    so it sums to >= 0); with ``eigenvalues=True`` also the Gram matrix's eigenvalues, ascending (the squared
    singular values). Computed from the members' Gram matrix (an ``m x m`` eigenproblem in float64), which
    costs one product over the weights instead of a full SVD.

    Example:
        >>> templates, coefficients = svd_templates(torch.randn(4, 576), 2)
        >>> templates.shape, coefficients.shape
        (torch.Size([2, 576]), torch.Size([4, 2]))
    """
    flat = rows.reshape(rows.shape[0], -1)
    values, vectors = torch.linalg.eigh(_gram(flat))  # ascending eigenvalues
    r = min(k, flat.shape[0])
    u = _orient(vectors[:, -r:].flip(-1)).to(flat.dtype)
    return (u.T @ flat, u, values) if eigenvalues else (u.T @ flat, u)


def mean_scaled_weights(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale-aware shared weight of ``rows`` (members x out x rest) and each member's per-channel scale.

    Returns ``(shared, scales)``: ``shared`` of shape ``(out, rest)``, whose channel ``c`` is the principal
    direction of the members' channel-``c`` kernels normalised to unit norm, scaled to their mean norm; and
    ``scales`` of shape ``(members, out)``, each member's least-squares scale of that kernel. Member ``j`` is
    approximated by ``scales[j, :, None] * shared``. A scale below :data:`ZERO_SCALE` is set to 0 (a dead
    channel). Where all members' kernels of a channel are positive multiples of one kernel, the
    approximation is exact.
    """
    norms = rows.norm(dim=2)  # (m, out)
    unit = rows / torch.where(norms > 0, norms, 1.0)[..., None]
    by_channel = unit.transpose(0, 1)  # (out, m, rest)
    _, vectors = torch.linalg.eigh(_gram(by_channel))  # (out, m, m), ascending
    top = _orient(vectors[..., -1:]).to(rows.dtype)  # (out, m, 1)
    direction = (top.transpose(1, 2) @ by_channel).squeeze(1)  # (out, rest)
    length = direction.norm(dim=1, keepdim=True)
    size = norms.mean(dim=0)[:, None]  # the members' mean norm per channel
    shared = direction / torch.where(length > 0, length, 1.0) * size
    energy = shared.square().sum(dim=1)  # (out,)
    scales = (rows * shared).sum(dim=2) / torch.where(energy > 0, energy, 1.0)
    scales = torch.where(scales.abs() < ZERO_SCALE, 0.0, scales)
    return shared, scales


# ------------------------------------------------------------------------------------------ folding


def _is_norm(m: nn.Module) -> bool:
    """A per-channel norm with eval-time statistics: BatchNorm (timm's BatchNormAct2d too) or a frozen one."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or all(
        isinstance(getattr(m, a, None), torch.Tensor) for a in ("weight", "bias", "running_mean", "running_var")
    )


def following_norms(model: nn.Module, paths: Iterable[str], name: str) -> dict[str, nn.Module | str]:
    """For each module path, the norm layer that alone reads its output, or a sentence saying why there is none.

    Read from the model's fx graph (BatchNorm kept whole as a leaf): the module's output must have exactly one
    user, a call of a BatchNorm-like module called once in the whole graph.
    """
    norm_types: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
    frozen = tuple(type(m) for m in model.modules() if _is_norm(m) and not isinstance(m, norm_types))
    graph = trace_model(model, name, leaves=norm_types + frozen)
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    found: dict[str, nn.Module | str] = {}
    for path in paths:
        nodes = calls.get(path, [])
        if len(nodes) != 1:
            found[path] = f"{path} is called {len(nodes)} times in the forward"
            continue
        users = list(nodes[0].users)
        user = users[0] if len(users) == 1 else None
        if user is None or user.op != "call_module" or not _is_norm(modules[str(user.target)]):
            what = ", ".join(_describe(u, modules) for u in users) or "nothing"
            found[path] = f"{path}'s output goes to {what}, not to a BatchNorm alone"
        elif len(calls[str(user.target)]) != 1:
            found[path] = f"{path}'s BatchNorm {user.target} is called more than once"
        else:
            found[path] = modules[str(user.target)]
    return found


def _describe(n: fx.Node, modules: dict[str, nn.Module]) -> str:
    if n.op == "call_module":
        return f"{n.target} ({type(modules[str(n.target)]).__name__})"
    return str(getattr(n.target, "__name__", n.target))


def check_foldable(norm: nn.Module, channels: int, where: str) -> None:
    """Raise WarmStartError unless ``norm`` holds affine weights and running statistics of ``channels`` channels."""
    tensors = [getattr(norm, a, None) for a in ("weight", "bias", "running_mean", "running_var")]
    if not all(isinstance(t, torch.Tensor) and t.shape == (channels,) for t in tensors):
        raise WarmStartError(
            f"{where}: init='mean-scaled' folds each member's scales into its BatchNorm, which needs affine "
            f"weights and running statistics of {channels} channels ({type(norm).__name__} has not); use init='mean'"
        )


@torch.no_grad()
def fold_scales(layer: nn.Module, norm: nn.Module, scales: torch.Tensor) -> None:
    """Make ``norm(layer(x))`` with ``layer``'s weight replaced by the shared ``K`` compute what it computed with
    ``scales[c] * K`` (per output channel ``c``): exact in eval mode, and in train mode up to the norm's eps.

    With ``z = s * z'`` (``z'`` the output with ``K``, the layer's bias divided by ``s``), BatchNorm's
    ``gamma (z - mu) / sqrt(var + eps)`` equals ``gamma' (z' - mu / s) / sqrt(var / s^2 + eps)`` for
    ``gamma' = gamma * s * sqrt(var / s^2 + eps) / sqrt(var + eps)``. A zero scale makes the channel constant:
    gamma' = 0 and beta' the constant.
    """
    weight, bias, mean, var = (getattr(norm, a) for a in ("weight", "bias", "running_mean", "running_var"))
    eps = float(getattr(norm, "eps", 1e-5))
    s = scales.to(torch.float64)
    zero = s == 0
    safe = torch.where(zero, 1.0, s)
    mu, sigma2 = mean.double(), var.double()
    gamma, beta = weight.double(), bias.double()
    layer_bias = getattr(layer, "bias", None)
    b = layer_bias.double() if isinstance(layer_bias, torch.Tensor) else torch.zeros_like(mu)
    constant = gamma * (b - mu) / torch.sqrt(sigma2 + eps) + beta  # a dead channel's output
    new_gamma = torch.where(zero, 0.0, gamma * safe * torch.sqrt(sigma2 / safe**2 + eps) / torch.sqrt(sigma2 + eps))
    new_beta = torch.where(zero, constant, beta)
    weight.copy_(new_gamma)
    bias.copy_(new_beta)
    mean.copy_(torch.where(zero, mu, mu / safe))
    var.copy_(torch.where(zero, sigma2, sigma2 / safe**2))
    if isinstance(layer_bias, torch.Tensor):
        layer_bias.copy_(torch.where(zero, b, b / safe))


# ------------------------------------------------------------------------------------ recalibration


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], n: int) -> int:
    """Re-estimate every BatchNorm's running statistics on the first ``n`` batches, in place.

    The statistics are reset and averaged cumulatively (``momentum=None``: each batch weighs the same) with
    the norms in train mode and every other module in eval mode (dropout off), without gradients; each
    module's train/eval flag and each norm's momentum are restored after. A batch is an input tensor or a
    tuple/list whose first element is (``(images, labels)``); it is moved to the model's device. When no batch
    comes, or the forward raises, the statistics are put back as they were.

    Returns:
        The number of batches used (fewer than ``n`` when ``batches`` runs out).

    Raises:
        ShareOptionError: ``n`` < 1, the model has no BatchNorm with running statistics, or ``batches`` is empty.

    Example:
        >>> share_transform.recalibrate_bn(model, train_loader, 100)
        100
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ShareOptionError(f"recalibrate_bn: n is the number of batches, an integer >= 1, got {n!r}")
    norms = _norms(model)
    if not norms:
        raise ShareOptionError(
            f"recalibrate_bn: {type(model).__name__} has no BatchNorm with running statistics to recalibrate"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    saved = [(m.momentum, {k: b.clone() for k, b in m._buffers.items() if b is not None}) for m in norms]
    used = 0
    with eval_mode(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for batch in batches:
                x = batch[0] if isinstance(batch, tuple | list) else batch
                model(x.to(device) if isinstance(x, torch.Tensor) and device is not None else x)
                used += 1
                if used == n:
                    break  # before drawing another batch from a loader
        except BaseException:
            used = 0
            raise
        finally:
            for m, (momentum, buffers) in zip(norms, saved):
                m.momentum = momentum
                if used == 0:
                    for k, b in buffers.items():
                        m._buffers[k].copy_(b)  # type: ignore[union-attr]
    if used == 0:
        raise ShareOptionError("recalibrate_bn: batches yielded nothing; the running statistics are unchanged")
    return used
