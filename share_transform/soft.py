"""Soft sharing: each member layer's weight is a learned mix of its group's template bank.

Savarese & Maire, "Learning Implicitly Recurrent CNNs Through Parameter Sharing" (ICLR 2019): a group of
layers owns a bank of ``k`` templates of their weight's shape, each member owns ``k`` coefficients, and its
weight is ``sum_i coeff_i * template_i``. ``k = 1`` is hard sharing up to one scale per member. Members are
``nn.Conv2d`` or, at scope ``"block"``, ``nn.Linear`` layers; a member's bias (when it has one) stays its own,
as each block's norms do.

The member stays an ``nn.Conv2d`` (or ``nn.Linear``): :func:`torch.nn.utils.parametrize.register_parametrization`
replaces its ``weight`` by :class:`TemplateMix`, whose stored tensor (``parametrizations.weight.original``) is the
member's ``k`` coefficients and whose forward is one ``tensordot`` with the bank (no Python loop over templates,
so the step costs about what a plain conv costs). ``state_dict``, ``torch.compile``, DDP and ``deepcopy`` keep
working; the bank is one module held by reference by every member's parametrization, so it survives ``to_empty``.

Example:
    >>> convs = [model.layer1[1].conv1, model.layer1[1].conv2]
    >>> bank = share_softly(convs, templates=2)  # the convs' weights now mix bank.templates
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "TemplateBank",
    "TemplateMix",
    "bake",
    "bank_of",
    "coefficients_of",
    "is_soft",
    "share_softly",
    "soft_coefficients",
]


class TemplateBank(nn.Module):
    """``k`` templates of one weight shape, in one ``nn.Parameter`` of shape ``(k, *weight.shape)``: ``(k, out,
    in, kh, kw)`` for a conv, ``(k, out, in)`` for a linear layer.

    Each template is He-normal (``kaiming_normal_``, fan-in), as the reference code initialises them.
    """

    def __init__(
        self,
        templates: int,
        shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.templates = nn.Parameter(torch.empty(templates, *shape, device=device, dtype=dtype))
        for t in self.templates.data:
            nn.init.kaiming_normal_(t)

    @property
    def k(self) -> int:
        return self.templates.shape[0]


class TemplateMix(nn.Module):
    """The parametrization of a member layer's weight: its coefficients (the stored tensor) mix ``bank``."""

    def __init__(self, bank: TemplateBank) -> None:
        super().__init__()
        self.bank = bank

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(coefficients, self.bank.templates, dims=1)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The coefficients whose mix is closest to ``weight`` (least squares), for ``conv.weight = W``."""
        basis = self.bank.templates.detach().reshape(self.bank.k, -1).T
        target = weight.detach().reshape(-1, 1).to(basis.dtype)
        if basis.device.type == "meta":
            return torch.empty(self.bank.k, device=basis.device, dtype=basis.dtype)
        return torch.linalg.lstsq(basis, target).solution.reshape(-1)


def _parametrizations(conv: nn.Module) -> nn.ModuleDict:
    return cast(nn.ModuleDict, conv.parametrizations)


def _mix(conv: nn.Module) -> TemplateMix | None:
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    first = cast(nn.ModuleList, _parametrizations(conv)["weight"])[0]
    return first if isinstance(first, TemplateMix) else None


def is_soft(conv: nn.Module) -> bool:
    """True when ``conv.weight`` (a conv's or a linear layer's) is a mix of a template bank."""
    return _mix(conv) is not None


def bank_of(conv: nn.Module) -> TemplateBank | None:
    """The template bank ``conv`` mixes, or None for a conv that owns (or hard-shares) its weight."""
    mix = _mix(conv)
    return mix.bank if mix is not None else None


def coefficients_of(conv: nn.Module) -> nn.Parameter:
    """The ``k`` coefficients of a soft member conv (its parametrization's stored tensor)."""
    if _mix(conv) is None:
        raise ValueError(f"{type(conv).__name__} is not a soft-shared conv")
    return cast(nn.Parameter, _parametrizations(conv)["weight"].original)


def _soft_convs(model: nn.Module) -> Iterator[nn.Module]:
    """The soft members of ``model``: convs and linear layers whose weight mixes a bank."""
    return (m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and is_soft(m))


def soft_coefficients(model: nn.Module) -> list[nn.Parameter]:
    """Every soft member's coefficients, in module order (the optimizer gives them no weight decay)."""
    return [coefficients_of(m) for m in _soft_convs(model)]


def share_softly(convs: Sequence[nn.Module], templates: int) -> TemplateBank:
    """Make ``convs`` (convs or linear layers of one weight shape) mix one new bank of ``templates`` templates;
    returns the bank. Their biases are left alone: each member keeps its own.

    Coefficients are initialised as the reference code does: the (members x k) matrix of the group is
    orthogonal (``nn.init.orthogonal_``), row j for member j in the order given.
    """
    weight = cast(torch.Tensor, convs[0].weight)
    bank = TemplateBank(templates, weight.shape, device=weight.device, dtype=weight.dtype)
    init = torch.empty(len(convs), templates)
    nn.init.orthogonal_(init)
    for conv, row in zip(convs, init):
        requires_grad = cast(torch.Tensor, conv.weight).requires_grad
        parametrize.register_parametrization(conv, "weight", TemplateMix(bank), unsafe=True)
        coefficients = coefficients_of(conv)
        with torch.no_grad():
            coefficients.copy_(row)
        coefficients.requires_grad_(requires_grad)
    bank.templates.requires_grad_(weight.requires_grad)
    return bank


def bake(model: nn.Module) -> nn.Module:
    """Replace every soft member's weight by a plain ``nn.Parameter`` holding its current mix, in place."""
    for conv in list(_soft_convs(model)):
        coefficients = coefficients_of(conv)
        with torch.no_grad():
            weight = cast(torch.Tensor, conv.weight).detach().clone()
        # Not parametrize.remove_parametrizations: it deletes the weight property from the module's class,
        # and a deepcopy shares that class with the original, which would lose its weight.
        del conv._modules["parametrizations"]
        conv.__class__ = type(conv).__bases__[0]
        conv.weight = nn.Parameter(weight, requires_grad=coefficients.requires_grad)
    return model
