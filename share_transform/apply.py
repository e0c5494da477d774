"""The one mutation step: tie the spatial convs of each share group to one ``nn.Parameter``.

Autograd then sums the members' gradients into the shared weight (paper eq. 5), and an optimizer sees
the weight once, so weight decay and momentum act once per shared weight. A soft-shared group
(``templates=k``) instead gives each member a parametrized weight mixing the group's template bank
(:mod:`share_transform.soft`).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import PlanMismatchError, ShareError, UnknownInitError
from .modelinfo import check_model, model_name
from .plan import SharePlan, check_policy, plan as make_plan
from .policies import INITS
from .signature import ConvSignature
from .soft import bake, bank_of, is_soft, share_softly

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


def _check_made_for(model: nn.Module, plan: SharePlan, groups: list[list[nn.Conv2d]]) -> None:
    """Raise unless ``plan`` was made for ``model``'s architecture: same name and same parameter count before
    sharing (a ResNet-18 plan's member paths and signatures all exist in a ResNet-34, so they are not enough)."""
    name = model_name(model)
    if plan.model_name != name:
        raise PlanMismatchError(
            f"{name}: the plan was made for {plan.model_name}; plan this model with share_transform.plan(model)"
        )
    if any(is_soft(c) for convs in groups for c in convs):
        return  # a soft-shared model's count is its banks': the members' paths and signatures matched above
    # The count before sharing, whether the groups are tied yet or not (retie, apply twice).
    before = count_parameters(model) + sum(
        g.numel * (len(convs) - len({id(c.weight) for c in convs})) for g, convs in zip(plan.groups, groups)
    )
    if before != plan.params_before:
        raise PlanMismatchError(
            f"{name}: the plan was made for a model of {plan.params_before:,} parameters, this one has {before:,} "
            "(another depth, width or class count); plan this model with share_transform.plan(model)"
        )


def apply(
    model: nn.Module,
    policy: str = "imagenet",
    *,
    plan: SharePlan | None = None,
    init: str = "first",
    input_size: tuple[int, int, int] | None = None,
    group_size: int | None = None,
    scope: str | None = None,
    templates: int | None = None,
    budget: float | None = None,
) -> nn.Module:
    """Turn ``model`` into its ShaResNet in place and return the same object.

    Within each stage, the spatial convs of a share group point at one ``nn.Parameter`` (or, with
    ``templates=k``, mix one bank of k templates); the model keeps its class and methods. Applying again to
    a shared model changes nothing.

    Args:
        model: the residual network.
        policy: ``"imagenet"`` (default), ``"cifar"`` or ``"swrn"``; ignored when ``plan`` is given.
        plan: a plan from :func:`share_transform.plan` (it carries its options); made here when omitted.
        init: hard sharing only: ``"first"`` keeps the first member's weight (training from scratch: the
            distribution stays as initialised; the Parameter object is kept, so an optimizer holding it stays
            valid); ``"mean"`` averages the members' kernels (warm start from a trained model). Soft groups
            are initialised as the reference code: He-normal templates, orthogonal coefficients.
        input_size: ``(C, H, W)`` for planning; defaults to the model's own.
        group_size, scope, templates, budget: the sharing options of :func:`share_transform.plan`;
            ignored when ``plan`` is given.

    Raises:
        PlanMismatchError: the plan does not fit the model (made for another architecture: another name,
            parameter count, member path or conv signature), or a group is shared the other way (hard
            against soft) already; :func:`untie` the model first.

    Example:
        >>> import timm, share_transform
        >>> model = share_transform.apply(timm.create_model("resnet152"))
        >>> share_transform.count_parameters(model)
        36821032
        >>> wrn = share_transform.apply(timm.create_model("wrn_28_10"), "swrn", templates=2)
        >>> share_transform.count_parameters(wrn)
        17125630
    """
    model = check_model(model)
    if init not in INITS:
        raise UnknownInitError(f"{model_name(model)}: unknown init {init!r}; choose one of {', '.join(INITS)}")
    if plan is None:
        plan = make_plan(
            model,
            policy,
            input_size=input_size,
            group_size=group_size,
            scope=scope,
            templates=templates,
            budget=budget,
        )
        groups = _group_convs(model, plan)
    else:
        check_policy(plan.policy, model_name(model))
        groups = _group_convs(model, plan)
        _check_made_for(model, plan, groups)
    for group, convs in zip(plan.groups, groups):
        soft = [is_soft(c) for c in convs]
        if group.templates is not None:
            banks = {id(bank_of(c)) for c in convs}
            bank = bank_of(convs[0])
            if all(soft) and len(banks) == 1 and bank is not None and bank.k == group.templates:
                continue  # already mixing this group's bank
        if any(soft):
            raise PlanMismatchError(
                f"{model_name(model)}: {group.members[soft.index(True)]} is soft-shared already, otherwise than "
                "the plan says; call share_transform.untie(model) first"
            )
        if group.templates is not None:
            share_softly(convs, group.templates)
            continue
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
    """Give every conv its own copy of its weight again (the inverse of ``apply``), in place.

    A soft-shared conv becomes a plain conv holding its current effective weight (its mix of the templates).
    """
    seen: set[int] = set()
    for m in bake(check_model(model)).modules():
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
    """True when every group of ``plan`` (default: the recorded one) holds one Parameter (or mixes one bank)."""
    plan = plan or get_plan(model)
    if plan is None:
        return False
    for group, convs in zip(plan.groups, _group_convs(model, plan)):
        if group.templates is None:
            tied = all(not is_soft(c) and c.weight is convs[0].weight for c in convs)
        else:
            bank = bank_of(convs[0])
            tied = bank is not None and bank.k == group.templates and all(bank_of(c) is bank for c in convs)
        if not tied:
            return False
    return True
