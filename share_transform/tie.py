"""The one mutation step: tie the layers of each share group to one ``nn.Parameter`` (and, at scope
``"block"``, one bias).

Autograd then sums the members' gradients into the shared weight (paper eq. 5), and an optimizer sees
the weight once, so weight decay and momentum act once per shared weight. A soft-shared group
(``templates=k``) instead gives each member a parametrized weight mixing the group's template bank
(:mod:`share_transform.soft`).

``apply`` also hooks the model's state dict, so that every tool that walks ``state_dict()`` sees each
shared tensor once: ``state_dict()`` lists it under its first name only (timm's ``ModelEmaV2``/``ModelEmaV3``
would otherwise decay it once per alias), and ``load_state_dict`` fills the other names from it, refuses
aliases with different values (an unshared checkpoint) and re-ties after ``assign=True``. The hooks work on
tensor identity, so any tensor held by several modules (a soft-shared group's template bank too) gets the
same treatment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .errors import CheckpointError, PlanMismatchError, UnknownInitError, WarmStartError
from .modelinfo import BUILD_ATTR, build_spec, check_model, model_name
from .planning import ShareGroup, SharePlan, check_policy, check_templates, plan as make_plan, sharing_options
from .policies import INITS, SharingOptions
from .signature import ConvSignature, signature_of
from .soft import TemplateBank, bake, bank_of, coefficients_of, is_soft, share_softly
from .warmstart import (
    RECONSTRUCTION_ATTR,
    Reconstruction,
    check_foldable,
    fold_scales,
    following_norms,
    mean_scaled_weights,
    mean_weight,
    measure,
    stack,
    svd_weights,
)

__all__ = [
    "apply",
    "count_parameters",
    "get_plan",
    "get_reconstruction",
    "install_tie_hooks",
    "is_tied",
    "retie",
    "untie",
]

#: Attribute under which ``apply`` records the plan on the model, for ``retie`` and ``save``.
PLAN_ATTR = "_share_plan"
#: Attribute under which a model shared by construction (``sharesnet18``...) records the name of the network it
#: shares (``resnet18``): ``untie`` gives the model that name back, and a refused re-plan names it.
PLAIN_ATTR = "_share_plain"


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of ``model``: a shared weight counts once."""
    return sum(p.numel() for p in model.parameters())


def get_plan(model: nn.Module) -> SharePlan | None:
    """The plan ``apply`` recorded on ``model``, or None for a model that was never shared."""
    return getattr(check_model(model), PLAN_ATTR, None)


def get_reconstruction(model: nn.Module) -> Reconstruction | None:
    """What the warm start of ``apply`` lost: the relative reconstruction error per group and in total.

    Recorded by ``apply`` when it computed shared weights from the members' (``init="mean"``,
    ``"mean-scaled"``, ``"svd"``); None for a model shared with ``init="first"`` or never shared.

    Example:
        >>> model = share_transform.apply(trained, templates=2, init="svd")
        >>> round(share_transform.get_reconstruction(model).total, 3)
        0.412
    """
    return getattr(check_model(model), RECONSTRUCTION_ATTR, None)


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What ``state_dict(keep_vars=True)`` lists without ``apply``'s hooks: every name, each alias included."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, p in m._parameters.items():
            if p is not None:
                tensors[prefix + name] = p
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                tensors[prefix + name] = b
    return tensors


def tensor_aliases(module: nn.Module) -> list[list[str]]:
    """The state-dict names of every tensor that ``module`` holds under several names, first name first.

    Example:
        >>> from share_transform.tie import tensor_aliases
        >>> tensor_aliases(share_transform.apply(timm.create_model("resnet50")))[0]
        ['layer1.0.conv2.weight', 'layer1.1.conv2.weight', 'layer1.2.conv2.weight']
    """
    names: dict[int, list[str]] = {}
    for name, t in state_tensors(module).items():
        names.setdefault(id(t), []).append(name)
    return [n for n in names.values() if len(n) > 1]


def alias_groups(model: nn.Module) -> frozenset[tuple[str, ...]]:
    """Names of the tensors that are one object, grouped (a shared weight lists all its members)."""
    return frozenset(tuple(names) for names in tensor_aliases(model))


def keep_ties(model: nn.Module, expected: frozenset[tuple[str, ...]], what: str) -> None:
    """Re-tie ``model`` if ``what`` (a move, a wrapper) untied it (docs/design.md, Tie traps); raise if that fails.

    ``expected`` is :func:`alias_groups` of the model before ``what``.

    Example:
        >>> ties = alias_groups(model)
        >>> model.to(device)
        >>> keep_ties(model, ties, f"moving the model to {device}")

    Raises:
        PlanMismatchError: the ties could not be restored.
    """
    if alias_groups(model) == expected:
        return
    if get_plan(model) is not None:
        retie(model)
    if alias_groups(model) != expected:
        raise PlanMismatchError(f"{what} untied the shared weights of the model and they could not be re-tied")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes: NaN equals the same NaN (a value comparison would call it different)."""
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_aliases_agree(
    state: Mapping[str, torch.Tensor], aliases: Iterable[Sequence[str]], model: nn.Module, source: str
) -> None:
    """Refuse a state dict whose names of one shared tensor hold different values.

    Copying them into the one tensor would silently keep whichever came last (an unshared checkpoint loaded
    into a tied model). ``aliases`` lists, per shared tensor, its names present in ``state``.

    Raises:
        CheckpointError naming two disagreeing names.
    """
    for names in aliases:
        for name in names[1:]:
            first, other = state[names[0]], state[name]
            if first.dtype != other.dtype:
                # One tensor has one dtype: whether the values agree or not, this is not an unshared checkpoint.
                raise CheckpointError(
                    f"{source} holds {names[0]} as {first.dtype} and {name} as {other.dtype}, but "
                    f"{model_name(model)} shares them as one tensor, which has one dtype; store every name of a "
                    "shared weight in one dtype (e.g. convert the state dict with .to(dtype) before saving)"
                )
            if not same_bytes(first, other):
                raise CheckpointError(
                    f"{source} holds different weights under {names[0]} and {name}, which {model_name(model)} "
                    "shares. It is an unshared checkpoint: load it before share_transform.apply (init='mean' "
                    "averages the kernels), or convert it with sharetx convert --checkpoint"
                )


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def _shape_text(shape: Iterable[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_state_fits(
    source: str, model: nn.Module, shapes: Mapping[str, tuple[int, ...]], own: Mapping[str, torch.Tensor]
) -> None:
    """Raise unless tensors of ``shapes`` (name -> shape) fit ``own`` (a model's :func:`state_tensors`) exactly.

    A tied model's aliases are satisfied by any one name of the shared tensor.

    Raises:
        CheckpointError naming the missing and unexpected keys and the shape mismatches (a few of each).
    """
    covered = {id(own[k]) for k in shapes if k in own}
    missing = [k for k, v in own.items() if k not in shapes and id(v) not in covered]
    unexpected = [k for k in shapes if k not in own]
    mismatched = [
        f"{k} (checkpoint {_shape_text(shapes[k])}, model {_shape_text(own[k].shape)})"
        for k in shapes
        if k in own and tuple(shapes[k]) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_names(mismatched)}")
    raise CheckpointError(
        f"{source} does not fit {model_name(model)}: {'; '.join(parts)}. "
        "Was it saved from another architecture? Check --model, --source and --num-classes"
    )


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = module.get_submodule(path)
    if attr in owner._parameters:
        owner._parameters[attr] = tensor  # type: ignore[assignment]  # the first name's Parameter
    else:
        owner._buffers[attr] = tensor


class _DropAliases:
    """``state_dict`` post-hook: each shared tensor under its first name only."""

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for names in tensor_aliases(module):
            for name in names[1:]:
                state.pop(prefix + name, None)


class _FillAliases:
    """``load_state_dict`` pre-hook: refuse disagreeing aliases, give every alias the value of a present one."""

    def __init__(self) -> None:
        self.aliases: list[list[str]] = []  # of the load in progress, for _Retie

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        self.aliases = tensor_aliases(module)
        present = [[prefix + n for n in names if prefix + n in state] for names in self.aliases]
        check_aliases_agree(state, present, module, "the state dict")
        for names, keys in zip(self.aliases, present):
            if keys:
                for name in names:
                    state.setdefault(prefix + name, state[keys[0]])


class _Retie:
    """``load_state_dict`` post-hook: ``assign=True`` gave every holder its own new tensor; point aliases back."""

    def __init__(self, fill: _FillAliases) -> None:
        self.fill = fill

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        tensors = state_tensors(module)
        for names in self.fill.aliases:
            first = tensors[names[0]]
            for name in names[1:]:
                if tensors[name] is not first:
                    _set_tensor(module, name, first)
        self.fill.aliases = []


def install_tie_hooks(model: nn.Module) -> nn.Module:
    """Hook ``model``'s ``state_dict`` and ``load_state_dict`` so each shared tensor is listed once (idempotent).

    ``apply`` calls it; call it yourself on a wrapper that holds tied modules but not the tied model itself.
    ``state_dict()`` then lists a shared tensor under its first name only; ``load_state_dict`` accepts the
    first name alone or every alias with equal values, refuses different values with ``CheckpointError``,
    and keeps the ties with ``assign=True``. The hooks work on tensor identity: a tensor held by several
    modules, whoever tied it, is listed once.

    Raises:
        NotAModuleError: ``model`` is not an ``nn.Module``.
    """
    check_model(model)
    if not any(isinstance(h, _DropAliases) for h in model._state_dict_hooks.values()):
        fill = _FillAliases()
        model.register_state_dict_post_hook(_DropAliases())
        model.register_load_state_dict_pre_hook(fill)
        model.register_load_state_dict_post_hook(_Retie(fill))
    return model


def _group_convs(model: nn.Module, plan: SharePlan) -> list[list[nn.Module]]:
    """Each group's member layers (convs, or linear layers at scope "block"), checked against the plan."""
    modules = dict(model.named_modules())
    name = model_name(model)
    out = []
    for g in plan.groups:
        convs = []
        for path in g.members:
            conv = modules.get(path)
            if conv is None or signature_of(conv) != g.signature:
                kind = "conv" if isinstance(g.signature, ConvSignature) else "linear layer"
                raise PlanMismatchError(
                    f"{name}: the plan (made for {plan.model_name}) expects a {kind} "
                    f"{g.signature.describe()} at {path!r}; plan this model with share_transform.plan(model)"
                )
            convs.append(conv)
        out.append(convs)
    return out


def _distinct(layers: Sequence[nn.Module], attr: str) -> int:
    """How many distinct tensors ``layers`` hold under ``attr``."""
    return len({id(getattr(m, attr)) for m in layers})


def _check_made_for(model: nn.Module, plan: SharePlan, groups: list[list[nn.Module]]) -> None:
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
        g.numel * (len(convs) - _distinct(convs, "weight")) + g.bias_numel * (len(convs) - _distinct(convs, "bias"))
        for g, convs in zip(plan.groups, groups)
    )
    if before != plan.params_before:
        raise PlanMismatchError(
            f"{name}: the plan was made for a model of {plan.params_before:,} parameters, this one has {before:,} "
            "(another depth, width or class count); plan this model with share_transform.plan(model)"
        )


def _describe(policy: str, options: SharingOptions) -> str:
    """``policy imagenet`` or ``policy cifar, group size 2``."""
    words = options.describe()
    return f"policy {policy}" + (f", {words}" if words else "")


def _same_request(recorded: SharePlan, policy: str, options: SharingOptions) -> bool:
    """Whether planning with ``policy`` and ``options`` (checked: scope resolved) asks for the recorded sharing.

    Compared as asked, not re-planned: a plan of the shared model would count its parameters as shared already.
    """
    asked = (policy, options.scope, options.templates, options.exclude, options.allocate)
    if asked != (recorded.policy, recorded.scope, recorded.templates, recorded.options.exclude, recorded.allocate):
        return False
    if options.budget is not None:
        return options.budget == recorded.budget  # the recorded plan resolved this budget into its group size
    return options.group_size == recorded.group_size


def _sharing(p: SharePlan) -> tuple[object, ...]:
    """What a plan ties: its policy, scope and groups (members, templates); not how a budget chose the group
    size, its counts or the input size it traced."""
    return (p.policy, p.scope, p.templates, tuple((g.members, g.templates) for g in p.groups))


def _refuse_replan(net: nn.Module, recorded: SharePlan, requested: str) -> PlanMismatchError:
    """The one-line refusal of the re-apply rule: a shared model keeps its plan until it is untied."""
    plain = getattr(net, PLAIN_ATTR, None)
    untie = "call share_transform.untie(model) first"
    way_out = f"start from {plain}, or {untie}" if plain else untie
    return PlanMismatchError(
        f"{model_name(net)} is shared already ({_describe(recorded.policy, recorded.options)}); "
        f"re-planning it ({requested}) is refused: {way_out}"
    )


def _check_ties(net: nn.Module, plan: SharePlan, groups: list[list[nn.Module]]) -> None:
    """Raise, before anything changes, when the model is tied otherwise than ``plan`` can share it.

    A group may be untied, hard-tied, or (for a soft group) mixing one bank of its templates already. Convs
    sharing a weight must be members of one group, and a soft conv a member of a soft group: the plan is the
    one record of the ties that ``save`` writes and ``load`` rebuilds.
    """
    name = model_name(net)
    for group, convs in zip(plan.groups, groups):
        soft = [is_soft(c) for c in convs]
        bank = bank_of(convs[0])
        if not any(soft) or (
            group.templates is not None
            and bank is not None
            and bank.k == group.templates
            and all(bank_of(c) is bank for c in convs)
        ):
            continue
        raise PlanMismatchError(
            f"{name}: {group.members[soft.index(True)]} is soft-shared already, otherwise than the plan says; "
            "call share_transform.untie(model) first"
        )
    group_of = {path: i for i, g in enumerate(plan.groups) for path in g.members}
    holders: dict[int, list[str]] = {}
    bias_holders: dict[int, list[str]] = {}
    for path, m in net.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            bank = bank_of(m)
            if bank is not None and path not in group_of:
                raise PlanMismatchError(
                    f"{name}: {path} is soft-shared already, which the plan does not say; "
                    "call share_transform.untie(model) first"
                )
            holders.setdefault(id(bank if bank is not None else m.weight), []).append(path)
            if isinstance(m.bias, torch.Tensor):
                bias_holders.setdefault(id(m.bias), []).append(path)
    shares_bias = {i for i, g in enumerate(plan.groups) if g.shares_bias}
    for what, held, allowed in (("weight", holders, None), ("bias", bias_holders, shares_bias)):
        for paths in held.values():
            groups_held = {group_of.get(path) for path in paths}
            if len(paths) > 1 and (  # the plan is what save records
                None in groups_held or len(groups_held) > 1 or (allowed is not None and not groups_held <= allowed)
            ):
                raise PlanMismatchError(
                    f"{name}: {paths[0]} and {paths[1]} share one {what}, which the plan does not say; "
                    "call share_transform.untie(model) first"
                )


def _check_init(net: nn.Module, init: str, todo: list[tuple[int, ShareGroup, list[nn.Module]]]) -> dict[int, nn.Module]:
    """Refuse an init that does not fit the groups, before anything changes; for ``"mean-scaled"``, the
    BatchNorm reading each member's output (by ``id`` of the member)."""
    name = model_name(net)
    for _, group, _ in todo:
        if init == "svd" and group.templates is None:
            raise WarmStartError(
                f"{name}: init='svd' warm-starts soft groups (templates=k); the plan's groups are hard-shared, "
                "so use init='mean' or 'mean-scaled', or give templates"
            )
        if init in ("mean", "mean-scaled") and group.templates is not None:
            raise WarmStartError(
                f"{name}: init={init!r} makes one hard-shared weight; soft groups ({group.templates} templates) "
                "warm-start with init='svd'"
            )
    norms: dict[int, nn.Module] = {}
    members = [(path, conv) for _, group, convs in todo for path, conv in zip(group.members, convs)]
    if init != "mean-scaled" or not members:
        return norms
    found = following_norms(net, [path for path, _ in members], name)
    for path, conv in members:
        norm = found[path]
        if isinstance(norm, str):
            raise WarmStartError(
                f"{name}: init='mean-scaled' folds each member's scales into the BatchNorm that reads its output, "
                f"but {norm}; use init='mean'"
            )
        check_foldable(norm, cast(torch.Tensor, conv.weight).shape[0], f"{name}: {path}")
        norms[id(conv)] = norm
    return norms


@torch.no_grad()
def _set_bank(convs: list[nn.Module], bank: TemplateBank, templates: torch.Tensor, coefficients: torch.Tensor) -> None:
    """Overwrite a new bank and its members' coefficients with the members' best rank-k approximation; templates
    beyond the members' count keep their He-normal draw, with coefficients 0."""
    r = templates.shape[0]
    bank.templates[:r].copy_(templates.reshape(r, *bank.templates.shape[1:]))
    for conv, row in zip(convs, coefficients):
        stored = coefficients_of(conv)
        stored.zero_()
        stored[:r].copy_(row)


def apply(
    model: nn.Module,
    policy: str = "imagenet",
    *,
    plan: SharePlan | None = None,
    init: str = "first",
    input_size: tuple[int, int, int] | None = None,
    options: SharingOptions | None = None,
    group_size: int | None = None,
    scope: str | None = None,
    templates: int | None = None,
    budget: float | None = None,
    exclude: Iterable[str] | None = None,
    allocate: str = "uniform",
) -> nn.Module:
    """Turn ``model`` into its ShaResNet in place and return the same object.

    Within each stage, the layers of a share group point at one ``nn.Parameter`` (at scope ``"block"``, one
    weight and one bias; with ``templates=k``, their weights mix one bank of k templates and each keeps its
    bias); the model keeps its class and methods.

    The re-apply rule: a shared model keeps its plan until it is untied. Applying the plan it records again
    (the same policy and options, or an equal plan) changes nothing but re-tying what a move untied; any other
    plan is refused with ``PlanMismatchError`` before anything changes: call :func:`untie` first. A model is
    never left half-shared: every check runs before the first tie.

    Args:
        model: the residual network.
        policy: ``"imagenet"`` (default), ``"cifar"`` or ``"swrn"``; ignored when ``plan`` is given.
        plan: a plan from :func:`share_transform.plan` (it carries its options); made here when omitted.
        init: how a new shared weight starts. ``"first"`` (default; training from scratch): a hard group keeps
            its first member's weight (the distribution stays as initialised; the Parameter object is kept, so
            an optimizer holding it stays valid), a soft group is initialised as the reference code (He-normal
            templates, orthogonal coefficients). Warm starts from trained weights
            (:mod:`share_transform.warmstart`), which record their reconstruction error
            (:func:`get_reconstruction`): ``"mean"`` (hard) averages the members' weights; ``"mean-scaled"``
            (hard) shares a kernel compared up to a per-channel scale and folds each member's scales into the
            BatchNorm that reads its output; ``"svd"`` (soft) sets each bank and its coefficients to the
            members' best rank-k approximation (exact when k >= members). A group that shares its bias (hard,
            scope ``"block"``) keeps the first member's bias under ``"first"`` and the members' mean bias
            otherwise; the reconstruction error measures the weights.
        input_size: ``(C, H, W)`` for planning; defaults to the model's own.
        options, group_size, scope, templates, budget, exclude, allocate: the sharing options of
            :func:`share_transform.plan` (a :class:`~share_transform.SharingOptions`, or keywords); ignored when
            ``plan`` is given.

    Raises:
        PlanMismatchError: the plan does not fit the model (made for another architecture: another name,
            parameter count, member path or conv signature); the model is shared already under another plan
            (``NAME is shared already (policy P); re-planning it (policy Q) is refused: call
            share_transform.untie(model) first``); or it is tied otherwise than the plan can share.
        UnknownInitError; WarmStartError: ``init`` does not fit the groups (``"svd"`` for hard sharing,
            ``"mean"`` for soft), or ``"mean-scaled"`` finds no BatchNorm reading a member's output.

    Example:
        >>> import timm, share_transform
        >>> model = share_transform.apply(timm.create_model("resnet152"))
        >>> share_transform.count_parameters(model)
        36821032
        >>> wrn = share_transform.apply(timm.create_model("wrn_28_10"), "swrn", templates=2)
        >>> share_transform.count_parameters(wrn)
        17125630
    """
    net = check_model(model)  # a torch.compile wrapper: the module it compiles
    name = model_name(net)
    if init not in INITS:
        raise UnknownInitError(f"{name}: unknown init {init!r}; choose one of {', '.join(INITS)}")
    recorded = get_plan(net)
    if plan is None:
        options = sharing_options(
            options,
            group_size=group_size,
            scope=scope,
            templates=templates,
            budget=budget,
            exclude=exclude,
            allocate=allocate,
        )
        if recorded is None:
            plan = make_plan(net, policy, input_size=input_size, options=options)
        else:
            rule = check_policy(policy, name)
            checked = options.check(name, rule)
            if not _same_request(recorded, rule.name, checked):
                raise _refuse_replan(net, recorded, _describe(rule.name, checked))
            plan = recorded
        groups = _group_convs(net, plan)
    else:
        check_policy(plan.policy, name)
        check_templates(plan)  # before a bank of that many templates is allocated
        if recorded is not None:
            if _sharing(plan) != _sharing(recorded):
                raise _refuse_replan(net, recorded, _describe(plan.policy, plan.options))
            plan = recorded  # an equal plan: the recorded one stays
        groups = _group_convs(net, plan)
        _check_made_for(net, plan, groups)
    _check_ties(net, plan, groups)
    todo: list[tuple[int, ShareGroup, list[nn.Module]]] = []  # the groups not shared yet
    for index, (group, convs) in enumerate(zip(plan.groups, groups)):
        if any(is_soft(c) for c in convs):
            continue  # mixing this group's bank already (_check_ties)
        if group.templates is None and all(
            c.weight is convs[0].weight and (not group.shares_bias or c.bias is convs[0].bias) for c in convs
        ):
            continue  # already shared: keep the Parameters so optimizers holding them stay valid
        todo.append((index, group, convs))
    norms = _check_init(net, init, todo)
    measured = []
    for index, group, convs in todo:
        weights = [cast(torch.Tensor, c.weight) for c in convs]
        real = not weights[0].is_meta
        if group.templates is not None:
            # The members' weights before the bank replaces them.
            start = svd_weights(index, group.members, weights, group.templates) if init == "svd" and real else None
            bank = share_softly(convs, group.templates)
            if start is not None:
                _set_bank(convs, bank, start[0], start[1])
                measured.append(start[2])
            continue
        if init == "first":
            shared = weights[0]
        else:
            with torch.no_grad():
                if not real:
                    value = torch.empty_like(weights[0])
                elif init == "mean":
                    value, error = mean_weight(index, group.members, weights)
                    measured.append(error)
                else:
                    rows = stack(weights)
                    value, scales = mean_scaled_weights(rows)
                    measured.append(measure(index, group.members, rows, scales[..., None] * value))
                    for conv, s in zip(convs, scales):
                        fold_scales(conv, norms[id(conv)], s)
            shared = nn.Parameter(
                value.reshape(weights[0].shape).to(weights[0].dtype), requires_grad=weights[0].requires_grad
            )
        for c in convs:
            c.weight = shared
        if group.shares_bias:  # after mean-scaled's fold, which rescales each member's bias
            _tie(convs, "bias", init)
    if measured:
        setattr(net, RECONSTRUCTION_ATTR, Reconstruction(init, tuple(measured)))
    setattr(net, PLAN_ATTR, plan)
    install_tie_hooks(net)
    return model


def _tie(layers: Sequence[nn.Module], attr: str, init: str) -> None:
    """Make ``layers`` hold one Parameter under ``attr``: the first one's (``init="first"``), or a new one
    holding their mean (the warm starts)."""
    tensors = [getattr(m, attr) for m in layers]
    if all(t is tensors[0] for t in tensors):
        return  # already shared: keep the Parameter so optimizers holding it stay valid
    if init == "first":
        shared = tensors[0]
    else:
        with torch.no_grad():
            mean = torch.stack([t.detach() for t in tensors]).mean(dim=0)
        shared = nn.Parameter(mean, requires_grad=tensors[0].requires_grad)
    for m in layers:
        setattr(m, attr, shared)


def retie(model: nn.Module) -> nn.Module:
    """Tie again the groups of the plan ``apply`` recorded, after something untied them.

    ``to_empty``, materialising a meta-device model, ``.to("meta")`` and weight-replacing tools (pruning)
    give each module its own new ``Parameter``; each group gets its first member's weight back.

    Raises:
        PlanMismatchError: no plan is recorded on the model (it was never shared with :func:`apply`).
    """
    plan = get_plan(check_model(model))
    if plan is None:
        raise PlanMismatchError(
            f"{model_name(model)}: no share plan is recorded on this model; call share_transform.apply(model) first"
        )
    return apply(model, plan=plan, init="first")


def untie(model: nn.Module) -> nn.Module:
    """Give every conv and linear layer its own copy of its weight and bias again (the inverse of ``apply``),
    in place.

    A soft-shared layer becomes a plain one holding its current effective weight (its mix of the templates).
    A model shared by construction (``sharesnet18``, ``wrn_40_4_share``) takes the name of the network it
    shared (``resnet18``, ``wrn_40_4``): an untied model never calls itself shared, and ``save`` records the
    network that rebuilds it.

    Example:
        >>> model = share_transform.untie(timm.create_model("sharesnet18"))
        >>> share_transform.apply(model, "cifar")  # re-planning: untie first (the re-apply rule)
    """
    net = check_model(model)
    seen: set[int] = set()
    for m in bake(net).modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            for attr in ("weight", "bias"):
                t = getattr(m, attr)
                if t is None:
                    continue
                if id(t) in seen:
                    setattr(m, attr, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
                else:
                    seen.add(id(t))
    for attr in (PLAN_ATTR, RECONSTRUCTION_ATTR):
        if hasattr(net, attr):
            delattr(net, attr)
    plain = getattr(net, PLAIN_ATTR, None)
    if plain is not None:
        _rename(net, plain)
        delattr(net, PLAIN_ATTR)
    return model


def _rename(net: nn.Module, name: str) -> None:
    """Give ``net`` the architecture name ``name`` where :func:`model_name` reads it (build record, timm cfg)."""
    spec = build_spec(net)
    if spec is not None:
        setattr(net, BUILD_ATTR, {**spec, "name": name})
    cfg = getattr(net, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        renamed = {**cfg, "architecture": name}
        setattr(net, "pretrained_cfg", renamed)  # noqa: B010  # nn.Module's typed __setattr__ refuses a dict
        if getattr(net, "default_cfg", None) is cfg:
            setattr(net, "default_cfg", renamed)  # noqa: B010  # timm keeps the two names on one dict


def is_tied(model: nn.Module, plan: SharePlan | None = None) -> bool:
    """True when every group of ``plan`` (default: the recorded one) holds one Parameter (one weight, and one
    bias where the group shares it) or mixes one bank."""
    net = check_model(model)
    plan = plan or get_plan(net)
    if plan is None:
        return False
    for group, convs in zip(plan.groups, _group_convs(net, plan)):
        if group.templates is None:
            tied = all(not is_soft(c) and c.weight is convs[0].weight for c in convs)
            tied = tied and (not group.shares_bias or all(c.bias is convs[0].bias for c in convs))
        else:
            bank = bank_of(convs[0])
            tied = bank is not None and bank.k == group.templates and all(bank_of(c) is bank for c in convs)
        if not tied:
            return False
    return True
