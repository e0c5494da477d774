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

Memory: a soft model holds its bank and each member's k coefficients, nothing else. The coefficients own a
storage of k elements (never a view of a larger buffer), the members' old weights are dropped, and the bank's
templates are one storage, so the bytes a soft model holds are its unique parameters and buffers times their
element size, and ``torch.save(model.state_dict())`` writes no more. Pickling works too (``torch.save(model)``,
``pickle``, ``copy.deepcopy``): torch refuses to pickle a parametrized module, so each member pickles as its
plain conv class plus its coefficients and its bank, and is parametrized again when unpickled.

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

from .errors import PlanMismatchError

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
        dtype = dtype or torch.get_default_dtype()
        # Drawn in float32 at least (the same draws as a float32 model), then stored in the model's dtype.
        draw = torch.empty(templates, *shape, device=device, dtype=torch.promote_types(dtype, torch.float32))
        for t in draw:
            nn.init.kaiming_normal_(t)
        self.templates = nn.Parameter(draw.to(dtype))

    @property
    def k(self) -> int:
        return self.templates.shape[0]


class TemplateMix(nn.Module):
    """The parametrization of a member layer's weight: its coefficients (the stored tensor) mix ``bank``.

    ``coefficients``, when given, is what the first ``right_inverse`` call returns: ``register_parametrization``
    calls it on the conv's weight, and a member starts from the coefficients it is given, not from a fit of a
    weight it is about to drop.
    """

    def __init__(self, bank: TemplateBank, coefficients: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bank = bank
        self._initial = coefficients

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(coefficients, self.bank.templates, dims=1)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The coefficients whose mix is closest to ``weight`` (least squares), for ``conv.weight = W``.

        Solved in float32 at least (lstsq has no half-precision kernel), returned in the bank's dtype in a
        storage of their own: lstsq's solution is a view of a buffer the size of the weight.
        """
        initial, self._initial = self._initial, None
        if initial is not None:
            return initial
        templates = self.bank.templates.detach()
        k, dtype = self.bank.k, templates.dtype
        if templates.is_meta or weight.is_meta:
            return torch.empty(k, device=templates.device, dtype=dtype)
        solve = torch.promote_types(dtype, torch.float32)
        basis = templates.reshape(k, -1).T.to(solve)
        target = weight.detach().reshape(-1, 1).to(device=basis.device, dtype=solve)
        return torch.linalg.lstsq(basis, target).solution.reshape(k).to(dtype, copy=True)


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
        raise PlanMismatchError(f"{type(conv).__name__} is not a soft-shared conv")
    return cast(nn.Parameter, _parametrizations(conv)["weight"].original)


def _soft_convs(model: nn.Module) -> Iterator[nn.Module]:
    """The soft members of ``model``: convs and linear layers whose weight mixes a bank."""
    return (m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and is_soft(m))


def soft_coefficients(model: nn.Module) -> list[nn.Parameter]:
    """Every soft member's coefficients, in module order (the optimizer gives them no weight decay)."""
    return [coefficients_of(m) for m in _soft_convs(model)]


def _pickle_member(conv: nn.Module, protocol: object) -> tuple[object, tuple[object, ...]]:
    """``__reduce_ex__`` of a soft member: torch's parametrized class refuses pickling (and cannot be found by
    name), so the member pickles as its plain class, its state without the parametrization, its coefficients
    (the same Parameter object) and its :class:`TemplateMix` (which holds the bank, pickled once for all)."""
    state = dict(conv.__dict__)
    state["_parameters"] = dict(conv._parameters)
    state["_modules"] = {k: m for k, m in conv._modules.items() if k != "parametrizations"}
    mix = _mix(conv)
    return _unpickle_member, (type(conv).__bases__[0], state, mix, coefficients_of(conv))


def _unpickle_member(
    cls: type[nn.Module], state: dict[str, object], mix: TemplateMix, coefficients: nn.Parameter
) -> nn.Module:
    conv = cls.__new__(cls)
    conv.__setstate__(state)
    conv._parameters["weight"] = coefficients
    mix._initial = coefficients.detach()  # the stored tensor stays this Parameter, with its own values
    _parametrize(conv, mix)
    return conv


def _parametrize(conv: nn.Module, mix: TemplateMix) -> None:
    """Make ``conv.weight`` the mix of ``mix``, its current weight Parameter holding the coefficients."""
    parametrize.register_parametrization(conv, "weight", mix, unsafe=True)
    type(conv).__reduce_ex__ = _pickle_member  # type: ignore[assignment,method-assign]  # this conv's own class


def share_softly(convs: Sequence[nn.Module], templates: int) -> TemplateBank:
    """Make ``convs`` (convs or linear layers of one weight shape) mix one new bank of ``templates`` templates;
    returns the bank. Their biases are left alone: each member keeps its own.

    Coefficients are initialised as the reference code does: the (members x k) matrix of the group is
    orthogonal (``nn.init.orthogonal_``), row j for member j in the order given. The members' old weights are
    dropped (an optimizer holding them keeps its own reference); members that were hard-shared get coefficients
    of their own.

    Raises:
        PlanMismatchError: (a ``ValueError``) no convs, a conv soft-shared already, or convs whose weights differ
            in shape, dtype or device: they cannot be one group (nothing is changed then).
    """
    if not convs:
        raise PlanMismatchError("share_softly needs at least one conv")
    weight = cast(torch.Tensor, convs[0].weight)
    for conv in convs:
        if is_soft(conv):
            raise PlanMismatchError(f"{type(conv).__name__} is soft-shared already")
        w = cast(torch.Tensor, conv.weight)
        if (w.shape, w.dtype, w.device) != (weight.shape, weight.dtype, weight.device):
            raise PlanMismatchError(
                f"soft-shared convs need one weight shape, dtype and device: {tuple(weight.shape)} {weight.dtype} "
                f"on {weight.device} against {tuple(w.shape)} {w.dtype} on {w.device}"
            )
    bank = TemplateBank(templates, weight.shape, device=weight.device, dtype=weight.dtype)
    init = torch.empty(len(convs), templates)
    nn.init.orthogonal_(init)
    for conv, row in zip(convs, init):
        requires_grad = cast(torch.Tensor, conv.weight).requires_grad
        # A new Parameter per member: register_parametrization keeps the Parameter it finds as the stored tensor
        # (set_ to what right_inverse returns), so members hard-tied to one Parameter would share coefficients.
        # ``row`` is cloned: a view would keep the whole (members x k) matrix alive.
        conv._parameters["weight"] = nn.Parameter(
            torch.empty(0, device=weight.device, dtype=weight.dtype), requires_grad=requires_grad
        )
        _parametrize(conv, TemplateMix(bank, row.clone().to(device=weight.device, dtype=weight.dtype)))
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
