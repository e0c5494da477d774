"""The one mutation step: tie the spatial convs of each share group to one ``nn.Parameter``.

Autograd then sums the members' gradients into the shared weight (paper eq. 5), and an optimizer sees
the weight once, so weight decay and momentum act once per shared weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import PlanMismatchError, ShareError, UnknownInitError
from .modelinfo import check_model, model_name
from .plan import SharePlan, check_policy, plan as make_plan
from .policies import INITS
from .signature import ConvSignature

#: Attribute under which ``apply`` records the plan on the model, for ``retie`` and ``save``.
PLAN_ATTR = "_share_plan"


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of ``model``: a shared weight counts once."""
    return sum(p.numel() for p in model.parameters())


def get_plan(model: nn.Module) -> SharePlan | None:
    """The plan ``apply`` recorded on ``model``, or None for a model that was never shared."""
    return getattr(model, PLAN_ATTR, None)


def _group_convs(model: nn.Module, plan: SharePlan) -> list[list[nn.Conv2d]]:
    modules = dict(model.named_modules())
    name = model_name(model)
    out = []
    for g in plan.groups:
        convs = []
        for path in g.members:
            conv = modules.get(path)
            if not isinstance(conv, nn.Conv2d) or ConvSignature.of(conv) != g.signature:
                raise PlanMismatchError(
                    f"{name}: the plan (made for {plan.model_name}) expects a conv "
                    f"{g.signature.describe()} at {path!r}; plan this model with share_transform.plan(model)"
                )
            convs.append(conv)
        out.append(convs)
    return out


def apply(
    model: nn.Module,
    policy: str = "imagenet",
    *,
    plan: SharePlan | None = None,
    init: str = "first",
    input_size: tuple[int, int, int] | None = None,
) -> nn.Module:
    """Turn ``model`` into its ShaResNet in place and return the same object.

    Within each stage, the spatial convs of a share group point at one ``nn.Parameter``; the model keeps
    its class and methods. Applying again to a shared model changes nothing.

    Args:
        model: the residual network.
        policy: ``"imagenet"`` (default) or ``"cifar"``; ignored when ``plan`` is given.
        plan: a plan from :func:`share_transform.plan`; made here when omitted.
        init: ``"first"`` keeps the first member's weight (training from scratch: the distribution stays
            as initialised; the Parameter object is kept, so an optimizer holding it stays valid);
            ``"mean"`` averages the members' kernels (warm start from a trained model).
        input_size: ``(C, H, W)`` for planning; defaults to the model's own.

    Example:
        >>> import timm, share_transform
        >>> model = share_transform.apply(timm.create_model("resnet152"))
        >>> share_transform.count_parameters(model)
        36821032
    """
    model = check_model(model)
    if init not in INITS:
        raise UnknownInitError(f"{model_name(model)}: unknown init {init!r}; choose one of {', '.join(INITS)}")
    if plan is None:
        plan = make_plan(model, policy, input_size=input_size)
    else:
        check_policy(plan.policy, model_name(model))
    for convs in _group_convs(model, plan):
        weights = [c.weight for c in convs]
        if all(w is weights[0] for w in weights):
            continue  # already shared: keep the Parameter so optimizers holding it stay valid
        if init == "first":
            shared = weights[0]
        else:
            with torch.no_grad():
                mean = torch.stack([w.detach() for w in weights]).mean(dim=0)
            shared = nn.Parameter(mean, requires_grad=weights[0].requires_grad)
        for c in convs:
            c.weight = shared
    setattr(model, PLAN_ATTR, plan)
    return model


def retie(model: nn.Module) -> nn.Module:
    """Tie again the groups of the plan ``apply`` recorded, after something untied them.

    ``to_empty``, materialising a meta-device model, ``.to("meta")`` and weight-replacing tools (pruning)
    give each module its own new ``Parameter``; each group gets its first member's weight back.
    """
    plan = get_plan(check_model(model))
    if plan is None:
        raise ShareError(
            f"{model_name(model)}: no share plan is recorded on this model; call share_transform.apply(model) first"
        )
    return apply(model, plan=plan, init="first")


def untie(model: nn.Module) -> nn.Module:
    """Give every conv its own copy of its weight again (the inverse of ``apply``), in place."""
    seen: set[int] = set()
    for m in check_model(model).modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            if id(w) in seen:
                m.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            else:
                seen.add(id(w))
    if hasattr(model, PLAN_ATTR):
        delattr(model, PLAN_ATTR)
    return model


def is_tied(model: nn.Module, plan: SharePlan | None = None) -> bool:
    """True when every group of ``plan`` (default: the recorded one) holds one Parameter."""
    plan = plan or get_plan(model)
    if plan is None:
        return False
    return all(all(c.weight is convs[0].weight for c in convs) for convs in _group_convs(model, plan))
