"""The share plan: which layers of which stage share one weight (analysis, never mutation).

``plan(model)`` runs trace -> shapes -> blocks/stages and returns a :class:`SharePlan`, a plain dataclass
that prints as a per-stage table and converts to and from JSON-ready dicts. ``apply`` (in
``share_transform.apply``) is the one step that ties parameters.

The rule (Boulch, "ShaResNet: reducing residual network parameter number by sharing weights",
arXiv 1702.08782; docs/design.md, The sharing rule): in every stage, the blocks' spatial convs that have the same
input resolution and the same conv signature, and stride 1, point at one shared weight.

Options turn that one operating point into a dial: ``group_size`` cuts a stage's sharable convs into runs
that each share one weight, ``scope="all"`` shares every spatial conv of the residual branch (both 3x3s of a
basic block), ``scope="block"`` every conv and linear layer of it (1x1s, depthwise convs, squeeze-excitation,
an MLP), weight and bias, ``templates=k`` makes each run a soft-shared group (a bank of k templates mixed by per-conv
coefficients; Savarese & Maire, ICLR 2019) and ``budget`` picks the least sharing that fits a parameter budget.
``exclude`` names layers whose convs keep their own weights whatever the rest of the options say.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .allocate import allocate_runs, gram, run_errors, run_saving
from .blocks import BranchLayer, ResidualBlock, find_blocks, lost_reductions
from .errors import InputSizeError, NoSpatialConvError, ShareOptionError, UnknownPolicyError
from .modelinfo import (
    check_input_size,
    check_model,
    conv_weight_keys,
    default_input_size,
    distinct_conv_weights,
    model_name,
    weight_storage,
)
from .policies import POLICIES, SCOPES, Policy, SharingOptions
from .signature import ConvSignature, Signature, signature_from_dict
from .text import format_columns
from .trace import propagate_shapes, trace_model

__all__ = ["ShareGroup", "SharePlan", "SpatialConv", "StagePlan", "plan", "sweep"]

KEPT_STRIDE = "strided"
KEPT_FIRST_BLOCK = "first block of the stage (policy cifar)"
KEPT_UNIQUE = "no other layer of this stage and signature"
KEPT_RUN = "alone in its run of group_size"
KEPT_ALLOCATED = "alone in its run (allocated by weights)"
KEPT_EXCLUDED = "excluded"


@dataclass(frozen=True)
class SpatialConv:
    """A layer the scope lets share and what the plan does with it: a block's spatial conv (scopes ``"last"``,
    ``"all"``), or any conv or linear layer of its residual branch (scope ``"block"``)."""

    path: str  # module path of the layer
    block: str  # name of its residual block
    stage: int  # 1-based stage index
    position: int  # 0-based position of its block in the stage
    resolution: tuple[int, int]  # spatial size of the layer's input
    signature: Signature
    group: int | None  # index into SharePlan.groups, None when the conv keeps its own weight
    kept_because: str | None  # why it keeps its own weight (None when it shares)


@dataclass(frozen=True)
class ShareGroup:
    """Layers of one stage that point at one shared weight (and, at scope ``"block"``, one shared bias)."""

    stage: int
    resolution: tuple[int, int]  # spatial size of the members' input
    signature: Signature
    members: tuple[str, ...]  # module paths, in the order the model computes them
    numel: int  # elements of the shared weight (of one template)
    templates: int | None = None  # soft sharing: a bank of this many templates; None = one hard-shared weight
    shares_bias: bool = False  # the members' biases are one Parameter too (hard sharing at scope "block")

    @property
    def bias_numel(self) -> int:
        """Elements of the shared bias (0 when the members keep their own or have none)."""
        return self.signature.bias_numel if self.shares_bias else 0

    @property
    def unique(self) -> int:
        """Parameters the group holds: the shared weight (and bias), or the bank plus each member's coefficients."""
        if self.templates is None:
            return self.numel + self.bias_numel
        return self.templates * (self.numel + len(self.members))

    @property
    def saved(self) -> int:
        """Parameters the group saves against a model in which every member has its own weight (< 0: adds)."""
        return (self.numel + self.bias_numel) * len(self.members) - self.unique

    @property
    def weights(self) -> int:
        """Distinct conv weights the group holds: 1, or its templates."""
        return self.templates or 1

    def describe(self) -> str:
        """``one 64x64x3x3 weight``, ``one 384x96 weight and bias`` or ``2 templates 64x64x3x3``."""
        shape = self.signature.describe()
        if self.templates is not None:
            return f"{self.templates} templates {shape}"
        return f"one {shape} weight" + (" and bias" if self.shares_bias else "")


@dataclass(frozen=True)
class StagePlan:
    """One stage: the run of residual blocks between two spatial reductions."""

    index: int  # 1-based
    resolution: tuple[int, int]  # spatial size of the blocks' output
    blocks: tuple[str, ...]
    spatial_convs: tuple[SpatialConv, ...]


@dataclass(frozen=True)
class SharePlan:
    """What ``apply`` will do to a model, and what it saves.

    ``params_*`` count unique parameters (a shared weight once) and ``convs_*`` count distinct
    ``nn.Conv2d`` weights (linear layers not included), before and after applying the plan to the model as it
    was planned.
    """

    model_name: str
    policy: str
    input_size: tuple[int, int, int]
    stages: tuple[StagePlan, ...]
    groups: tuple[ShareGroup, ...]
    params_before: int
    params_after: int
    convs_before: int
    convs_after: int
    #: The sharing options, scope resolved and ``budget`` (when given) resolved into ``group_size``.
    options: SharingOptions = SharingOptions(scope="last")

    @property
    def group_size(self) -> int | None:
        """Convs per run; None = the whole stage."""
        return self.options.group_size

    @property
    def scope(self) -> str:
        return self.options.scope or "last"

    @property
    def templates(self) -> int | None:
        """Soft sharing with this many templates per group; None = hard sharing."""
        return self.options.templates

    @property
    def budget(self) -> float | None:
        """The budget that chose ``group_size``, when one was given."""
        return self.options.budget

    @property
    def allocate(self) -> str:
        """``"weights"``: the groups are the runs the trained weights chose (``group_size`` None)."""
        return self.options.allocate

    def describe_options(self) -> str:
        """The options that differ from the paper's, e.g. ``group size 2, scope all, 2 templates``."""
        return self.options.describe()

    @property
    def decrease(self) -> float:
        """Fraction of the parameters the plan removes (0.39 for ResNet-152)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def spatial_convs_removed(self) -> int:
        """Layers that lose their own weight: sum over groups of (members - 1)."""
        return sum(len(g.members) - 1 for g in self.groups)

    @property
    def spatial_convs(self) -> tuple[SpatialConv, ...]:
        return tuple(c for s in self.stages for c in s.spatial_convs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` restores an equal plan."""

        def conv(c: SpatialConv) -> dict[str, Any]:
            return {**c.__dict__, "signature": c.signature.to_dict()}

        def group(g: ShareGroup) -> dict[str, Any]:
            d = {**g.__dict__, "signature": g.signature.to_dict(), "members": list(g.members)}
            if not g.shares_bias:
                del d["shares_bias"]  # a plan without bias sharing writes what it wrote before scope "block"
            return d

        return {
            "model_name": self.model_name,
            "policy": self.policy,
            "input_size": list(self.input_size),
            "stages": [
                {
                    "index": s.index,
                    "resolution": list(s.resolution),
                    "blocks": list(s.blocks),
                    "spatial_convs": [conv(c) for c in s.spatial_convs],
                }
                for s in self.stages
            ],
            "groups": [group(g) for g in self.groups],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "convs_before": self.convs_before,
            "convs_after": self.convs_after,
            **self.options.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharePlan:
        def conv(c: dict[str, Any]) -> SpatialConv:
            return SpatialConv(
                **{**c, "resolution": tuple(c["resolution"]), "signature": signature_from_dict(c["signature"])}
            )

        return cls(
            model_name=d["model_name"],
            policy=d["policy"],
            input_size=check_input_size(d["input_size"], d["model_name"]),
            stages=tuple(
                StagePlan(
                    index=s["index"],
                    resolution=tuple(s["resolution"]),
                    blocks=tuple(s["blocks"]),
                    spatial_convs=tuple(conv(c) for c in s["spatial_convs"]),
                )
                for s in d["stages"]
            ),
            groups=tuple(
                ShareGroup(
                    stage=g["stage"],
                    resolution=tuple(g["resolution"]),
                    signature=signature_from_dict(g["signature"]),
                    members=tuple(g["members"]),
                    numel=g["numel"],
                    templates=g.get("templates"),
                    shares_bias=g.get("shares_bias", False),  # absent before scope "block"
                )
                for g in d["groups"]
            ),
            params_before=d["params_before"],
            params_after=d["params_after"],
            convs_before=d["convs_before"],
            convs_after=d["convs_after"],
            # Files written before the options existed hold the paper's plan.
            options=SharingOptions.from_dict({**d, "scope": d.get("scope", "last")}),
        )

    def __str__(self) -> str:
        size = "x".join(str(s) for s in self.input_size)
        rows = [("stage", "resolution", "blocks", "shared", "groups", "shared weight", "templates", "params saved")]
        for s in self.stages:
            groups = [g for g in self.groups if g.stage == s.index]
            rows.append(
                (
                    str(s.index),
                    "x".join(str(r) for r in s.resolution),
                    str(len(s.blocks)),
                    f"{sum(c.group is not None for c in s.spatial_convs)}/{len(s.spatial_convs)}",
                    str(len(groups)),
                    ", ".join(sorted({g.signature.describe() for g in groups})) or "-",
                    str(self.templates) if self.templates is not None and groups else "-",
                    f"{sum(g.saved for g in groups):,}",
                )
            )
        options = self.describe_options()
        lines = [
            f'ShaResNet plan for {self.model_name} (policy "{self.policy}", input {size}'
            + (f"; {options})" if options else ")")
        ]
        lines += format_columns(rows, left={1, 5})
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} ({-100 * self.decrease:+.1f}%)"
        )  # soft banks can add parameters
        lines.append(f"distinct conv weights: {self.convs_before} -> {self.convs_after}")
        excluded = [c.path for c in self.spatial_convs if c.kept_because == KEPT_EXCLUDED]
        if excluded:
            lines.append(f"excluded (keep their own weights): {', '.join(excluded)}")
        return "\n".join(lines)


def check_policy(policy: str, name: str) -> Policy:
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        raise UnknownPolicyError(
            f"{name}: unknown policy {policy!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None


def check_templates(share_plan: SharePlan) -> None:
    """Raise unless every soft group holds at most as many templates as the plan's largest group has members.

    A bank of k = members templates already reproduces every member's weight exactly (each member's
    coefficients can pick its own template), so more templates than any group has members add parameters and
    nothing else. The bound also keeps a typo (``templates=100000``) or a file's header from allocating a bank
    of that many weights: :func:`plan`, ``apply(plan=...)`` and the file reader all check it before allocating.

    Raises:
        ShareOptionError naming the largest group's member count.
    """
    largest = max((len(g.members) for g in share_plan.groups), default=0)
    for g in share_plan.groups:
        if g.templates is not None and g.templates > largest:
            raise ShareOptionError(
                f"{share_plan.model_name}: templates={g.templates} is more than the {largest} members of the plan's "
                f"largest group; a bank of as many templates as members already reproduces each member exactly, "
                f"so give templates <= {largest}"
            )


def _stages(blocks: Sequence[ResidualBlock]) -> list[list[ResidualBlock]]:
    """Consecutive blocks with the same output resolution and channel count form a stage.

    The channel count matters on dilated backbones (``output_stride=8`` or ``16``): their later stages
    trade the stride for dilation and keep the resolution, but each still opens with a wider block.
    """
    stages: list[list[ResidualBlock]] = []
    for b in blocks:
        prev = stages[-1][-1] if stages else None
        if prev is None or (prev.output, prev.channels) != (b.output, b.channels):
            stages.append([])
        stages[-1].append(b)
    return stages


def sharing_options(
    options: SharingOptions | None,
    *,
    group_size: int | None = None,
    scope: str | None = None,
    templates: int | None = None,
    budget: float | None = None,
    exclude: Iterable[str] | None = None,
    allocate: str = "uniform",
) -> SharingOptions:
    """One :class:`SharingOptions` from ``options=`` or the loose keywords of ``plan`` and ``apply``, not both.

    Raises:
        ShareOptionError: both were given, or ``exclude`` is one string (a list of them is meant).
    """
    if isinstance(exclude, str):  # tuple() would split it into characters
        raise ShareOptionError(
            f"exclude takes a list of module paths or glob patterns, not one string: exclude=[{exclude!r}]"
        )
    loose = SharingOptions(
        group_size=group_size,
        scope=scope,
        templates=templates,
        budget=budget,
        exclude=() if exclude is None else tuple(exclude),
        allocate=allocate,
    )
    if options is None:
        return loose
    if loose != SharingOptions():
        raise ShareOptionError("give the sharing options as options=SharingOptions(...) or as keywords, not both")
    return options


def plan(
    model: nn.Module,
    policy: str = "imagenet",
    *,
    input_size: Sequence[int] | None = None,
    options: SharingOptions | None = None,
    group_size: int | None = None,
    scope: str | None = None,
    templates: int | None = None,
    budget: float | None = None,
    exclude: Iterable[str] | None = None,
    allocate: str = "uniform",
) -> SharePlan:
    """Plan the ShaResNet transform of ``model`` without changing it.

    Args:
        model: a timm or torchvision ResNet / Wide-ResNet / ResNeXt (any residual CNN whose blocks end in
            an ``add``).
        policy: ``"imagenet"`` (default; every stride-1 spatial conv of a stage shares), ``"cifar"``
            (the first block of every stage keeps its own conv) or ``"swrn"`` (the soft-sharing WRN:
            policy ``cifar`` with scope ``"all"``; ``templates`` required).
        input_size: ``(C, H, W)`` for shape propagation; defaults to the model's own.
        group_size: the sharable spatial convs of a stage, in the order the model computes them, are cut
            into consecutive runs of this many; each run shares one weight. None (default) = the whole
            stage, as the paper; 1 = no sharing.
        scope: ``"last"`` (the block's last spatial conv, as the paper), ``"all"`` (every spatial conv on
            the residual branch, e.g. both 3x3s of a basic block) or ``"block"`` (every ``nn.Conv2d`` and
            ``nn.Linear`` on the residual branch: 1x1s, depthwise, squeeze-excitation, MLP; weight and bias
            under hard sharing); each shares a superset of the one before. Default: the policy's (``"last"``
            except for ``swrn``).
        templates: None (default) = hard sharing, one Parameter per run; ``k >= 1`` = soft sharing: each
            run owns a bank of k templates and each member k coefficients.
        budget: the least sharing that brings the unique parameters to at most ``budget`` x the
            original: the smallest ``group_size`` that reaches it (recorded in the plan).
        allocate: ``"uniform"`` (default): runs of ``group_size`` (or the budget's). ``"weights"`` (needs
            ``budget`` and trained weights): each stage's sharable convs of one signature are cut into the
            consecutive runs, of any lengths, whose sharing loses least (the least total reconstruction error,
            the mean or the best rank-k approximation of each run as its shared weight) under the budget;
            an exact search (:mod:`share_transform.allocate`). The plan's groups are the runs chosen.
        exclude: module paths or glob patterns whose spatial convs keep their own weights (Torch-Pruning's
            ``ignored_layers``): a conv is excluded when its path, or the path of a module holding it, matches
            one with ``fnmatch`` (``["layer4.*"]``, ``["layer3.2", "*.conv2"]``); recorded in the plan, where
            each such conv is kept ``"excluded"``.
        options: the options above as one :class:`~share_transform.SharingOptions` (instead of the
            keywords).

    Returns:
        A :class:`SharePlan`; ``print`` it for the per-stage table.

    Raises:
        NotAModuleError, UnknownPolicyError, ShareOptionError (an option out of range, ``budget`` with
        ``group_size``, ``swrn`` without ``templates``, an unreachable budget, an ``exclude`` pattern that
        matches no module of the model, ``allocate="weights"`` without a budget or on a model without data),
        TraceError, InputSizeError, NoSpatialConvError (no residual block holds a layer the scope shares).

    Example:
        >>> import timm, share_transform
        >>> p = share_transform.plan(timm.create_model("resnet50"))
        >>> p.params_before, p.params_after
        (25557032, 20469800)
        >>> share_transform.plan(timm.create_model("resnet101"), budget=0.75).group_size  # 44.5 M -> 32.4 M
        4
        >>> share_transform.plan(timm.create_model("resnet50"), exclude=["layer4.*"]).params_after
        22829096
        >>> share_transform.plan(timm.create_model("resnet50"), scope="block").params_after  # 42.9% fewer
        14587944
    """
    model = check_model(model)
    name = model_name(model)
    rule = check_policy(policy, name)
    options = sharing_options(
        options,
        group_size=group_size,
        scope=scope,
        templates=templates,
        budget=budget,
        exclude=exclude,
        allocate=allocate,
    )
    options = options.check(name, rule)
    analysis = _analyse(model, name, input_size)
    return _make_plan(analysis, rule, options)


def sweep(
    model: nn.Module,
    policy: str = "imagenet",
    *,
    input_size: Sequence[int] | None = None,
    scopes: Sequence[str] = SCOPES,
    templates: Sequence[int | None] = (None, 1, 2, 4),
    exclude: Iterable[str] = (),
) -> list[SharePlan]:
    """Plans of ``model`` over the dial: every scope x group size x templates, tracing the model once.

    Group sizes are 1, 2, 4, ... below the longest run of sharable layers of the scope, then None (the whole
    stage); group size 1 (no sharing) comes once per scope. ``templates=None`` (hard sharing) is skipped for a
    policy that needs templates (``swrn``). ``exclude`` (as :func:`plan`'s) holds for every plan. A scope under
    which no residual block holds a layer is left out (a block of 1x1 convs has nothing at ``"last"``);
    NoSpatialConvError when every scope is.

    Example:
        >>> for p in share_transform.sweep(timm.create_model("resnet50")):
        ...     print(p.scope, p.group_size, p.templates, p.params_after)
    """
    model = check_model(model)
    name = model_name(model)
    rule = check_policy(policy, name)
    excluded = sharing_options(None, exclude=exclude).exclude
    analysis = _analyse(model, name, input_size)
    plans = []
    nothing: list[NoSpatialConvError] = []
    for scope in scopes:
        SharingOptions(scope=scope, templates=1, exclude=excluded).check(name, rule)  # an unknown scope fails here
        try:  # hard, whole stages: the longest runs
            stage = _make_plan(analysis, rule, SharingOptions(scope=scope, exclude=excluded))
        except NoSpatialConvError as e:
            nothing.append(e)
            continue
        longest = max((len(g.members) for g in stage.groups), default=1)
        sizes: list[int | None] = [2**i for i in range(longest.bit_length()) if 2**i < longest] + [None]
        for group_size in sizes:
            choices = [k for k in templates if k is not None or not rule.needs_templates]
            # Runs of one convert nothing: one row stands for every templates value. More templates than the
            # largest group's members is refused (check_templates): those settings are not on the dial.
            largest = longest if group_size is None else min(group_size, longest)
            choices = [k for k in choices if k is None or k <= largest]
            for k in choices[:1] if group_size == 1 else choices:
                options = SharingOptions(group_size=group_size, scope=scope, templates=k, exclude=excluded)
                options = options.check(name, rule)
                plans.append(_make_plan(analysis, rule, options))
    if nothing and not plans:
        raise nothing[0]
    return plans


#: A candidate list: the stage, the input resolution and the signature its sharable layers have in common.
Key = tuple[int, tuple[int, int], Signature]


@dataclass(frozen=True)
class _Analysis:
    """What tracing a model tells every plan of it: its residual blocks and its counts."""

    model: nn.Module
    name: str
    input_size: tuple[int, int, int]
    blocks: list[ResidualBlock]  # every block with a conv or linear layer on its residual branch
    params_before: int
    convs_before: int

    def stages(self, scope: str) -> list[list[ResidualBlock]]:
        """The stages the scope sees: at ``"last"`` and ``"all"`` the blocks with a spatial conv, as the paper
        counts blocks; at ``"block"`` every block with a conv or linear layer.

        Raises:
            NoSpatialConvError: no block holds a layer the scope shares.
        """
        blocks = self.blocks if scope == "block" else [b for b in self.blocks if b.spatial_conv is not None]
        if not blocks:
            what = "a conv or linear layer on its residual branch" if scope == "block" else "a spatial conv"
            raise NoSpatialConvError(
                f"{self.name}: found no residual block with {what}, so there is nothing to share"
                + (" at scope block" if scope == "block" else "")
                + ". share_transform works on residual CNNs (ResNet, Wide-ResNet, ResNeXt"
                + (", RegNet, ConvNeXt, EfficientNet, MobileNet" if scope == "block" else "")
                + " and their timm variants)."
            )
        return _stages(blocks)


def _analyse(model: nn.Module, name: str, input_size: Sequence[int] | None) -> _Analysis:
    size = check_input_size(input_size, name) if input_size is not None else default_input_size(model)
    graph = trace_model(model, name)
    propagate_shapes(model, graph, size, name)
    lost = lost_reductions(graph, model)
    if lost:
        raise InputSizeError(
            f"{name}: input size {'x'.join(map(str, size))} is too small to tell the stages apart (the input of "
            f"the strided conv {lost[0]} is 1 pixel wide). Pass a larger input_size=(C, H, W)."
        )
    return _Analysis(
        model,
        name,
        size,
        find_blocks(graph, model),
        sum(p.numel() for p in model.parameters()),
        distinct_conv_weights(model),
    )


def _scope_layers(block: ResidualBlock, scope: str) -> tuple[BranchLayer, ...]:
    """The layers of ``block`` that ``scope`` lets share, in compute order."""
    if scope == "block":
        return block.branch_layers
    if scope == "all":
        return block.branch_convs
    assert block.spatial_conv is not None and block.signature is not None and block.conv_input is not None
    return (BranchLayer(block.spatial_conv, block.signature, block.conv_input),)


def _excluded_by(patterns: Sequence[str], paths: Iterable[str], name: str) -> Callable[[str], bool]:
    """A test ``is_excluded(conv_path)`` for ``patterns``, after checking that each matches a module in ``paths``.

    Raises:
        ShareOptionError: a pattern matches no module path (a typo, or a layer of another model).
    """
    paths = list(paths)
    for pattern in patterns:
        if not fnmatch.filter(paths, pattern):
            close = difflib.get_close_matches(pattern, paths, n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else f"its top-level modules are {', '.join(p for p in paths if '.' not in p)}"
            )
            raise ShareOptionError(f"{name}: exclude pattern {pattern!r} matches no module of the model; {hint}")

    def is_excluded(path: str) -> bool:
        parts = path.split(".")
        holders = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # layer4, layer4.0, layer4.0.conv2
        return any(fnmatch.fnmatchcase(h, p) for h in holders for p in patterns)

    return is_excluded


def _make_plan(analysis: _Analysis, rule: Policy, options: SharingOptions) -> SharePlan:
    """The plan of ``options`` (checked, scope resolved) on the traced model."""
    scope = options.scope or "last"
    group_size, templates, budget = options.group_size, options.templates, options.budget
    allocate = options.allocate
    name, stage_blocks = analysis.name, analysis.stages(scope)
    params_before, convs_before = analysis.params_before, analysis.convs_before
    modules = dict(analysis.model.named_modules())
    is_excluded = _excluded_by(options.exclude, (p for p in modules if p), name)
    # Hard sharing at scope "block" ties whole layers, bias included; soft members keep their own bias.
    shares_bias = scope == "block" and templates is None

    # Candidates: stride-1 layers not kept by the policy, grouped by (stage, input resolution, signature),
    # each list in the order the model computes them.
    candidates: dict[Key, list[str]] = {}
    placed: list[tuple[int, int, ResidualBlock, BranchLayer, str | None]] = []
    seen: set[str] = set()
    for s, stage in enumerate(stage_blocks, start=1):
        for position, b in enumerate(stage):
            for c in _scope_layers(b, scope):
                if c.path in seen:
                    continue  # a block nested in another's branch: its layers are planned once, with it
                seen.add(c.path)
                kept = None
                if is_excluded(c.path):  # the caller's word first: it holds whatever else is true of the conv
                    kept = KEPT_EXCLUDED
                elif not c.signature.is_stride_one:
                    kept = KEPT_STRIDE
                elif rule.keep_first_block and position == 0:
                    kept = KEPT_FIRST_BLOCK
                else:
                    candidates.setdefault((s, c.resolution, c.signature), []).append(c.path)
                placed.append((s, position, b, c, kept))

    def numel_of(sig: Signature) -> int:
        numel = 1
        for d in sig.weight_shape:
            numel *= d
        return numel

    def grouping(runs: dict[Key, list[int]]) -> tuple[list[ShareGroup], int, int]:
        """The groups for ``runs`` (per candidate list, its run lengths in order), and the parameters and conv
        weights they remove."""
        groups: list[ShareGroup] = []
        saved = removed = 0
        for key, convs in candidates.items():
            stage_index, resolution, sig = key
            start = 0
            for length in runs[key]:
                members = convs[start : start + length]
                start += length
                if len(members) < 2:
                    continue
                group = ShareGroup(
                    stage_index, resolution, sig, tuple(members), numel_of(sig), templates, shares_bias and sig.bias
                )
                # What the members hold now (they may be tied already): each tensor once.
                storage: dict[int, int] = {}
                keys: set[tuple[int, int]] = set()
                for m in members:
                    storage.update(weight_storage(modules[m], bias=group.shares_bias))
                    keys |= conv_weight_keys(modules[m])
                saved += sum(storage.values()) - group.unique
                if isinstance(sig, ConvSignature):  # the counts of distinct weights are of convs
                    removed += len(keys) - group.weights
                groups.append(group)
        return groups, saved, removed

    def uniform(run: int | None) -> dict[Key, list[int]]:
        """Runs of ``run`` convs (None: the whole list), the last one shorter."""
        return {key: [min(run or n, n - s) for s in range(0, n, run or n)] for key, n in sizes.items()}

    sizes = {key: len(convs) for key, convs in candidates.items()}
    if allocate == "weights":
        assert budget is not None  # check_options
        runs = _allocate_by_weights(analysis, rule, candidates, modules, scope, templates, budget)
    else:
        if budget is not None:
            longest = max(sizes.values(), default=1)
            after = {}
            for run in range(1, longest + 1):
                after[run] = params_before - grouping(uniform(run))[1]
                if after[run] <= budget * params_before:
                    group_size = run
                    break
            else:
                best = min(after, key=after.__getitem__)
                raise ShareOptionError(
                    f"{name}: budget {budget:g} is unreachable; the least this sharing reaches (policy {rule.name}, "
                    f"scope {scope}, templates {templates}) is {after[best] / params_before:.4f} of the original "
                    f"parameters (group_size={best})"
                )
        runs = uniform(group_size)

    groups, saved_now, removed_now = grouping(runs)
    if allocate == "weights" and budget is not None and params_before - saved_now > budget * params_before:
        raise ShareOptionError(
            f"{name}: the convs to share are tied otherwise already, so allocate='weights' cannot count what its "
            "runs save; untie the model (share_transform.untie) first"
        )
    group_of = {m: i for i, g in enumerate(groups) for m in g.members}
    peers = {m: len(convs) for convs in candidates.values() for m in convs}
    stages = []
    for s, stage in enumerate(stage_blocks, start=1):
        spatial = []
        for _, position, b, c, kept in (p for p in placed if p[0] == s):
            group = group_of.get(c.path)
            if group is None and kept is None:
                kept = KEPT_UNIQUE if peers[c.path] == 1 else KEPT_ALLOCATED if allocate == "weights" else KEPT_RUN
            spatial.append(SpatialConv(c.path, b.name, s, position, c.resolution, c.signature, group, kept))
        stages.append(StagePlan(s, stage[0].output, tuple(b.name for b in stage), tuple(spatial)))

    share_plan = SharePlan(
        model_name=name,
        policy=rule.name,
        input_size=analysis.input_size,
        stages=tuple(stages),
        groups=tuple(groups),
        params_before=params_before,
        params_after=params_before - saved_now,
        convs_before=convs_before,
        convs_after=convs_before - removed_now,
        options=SharingOptions(
            group_size=group_size,
            scope=scope,
            templates=templates,
            budget=budget,
            exclude=options.exclude,
            allocate=options.allocate,
        ),
    )
    check_templates(share_plan)
    return share_plan


def _allocate_by_weights(
    analysis: _Analysis,
    rule: Policy,
    candidates: dict[Key, list[str]],
    modules: dict[str, nn.Module],
    scope: str | None,
    templates: int | None,
    budget: float,
) -> dict[Key, list[int]]:
    """The run lengths of every candidate list that meet ``budget`` with the least total reconstruction error."""
    name, before = analysis.name, analysis.params_before
    lists = []
    for key, convs in candidates.items():
        weights = [cast(torch.Tensor, modules[path].weight) for path in convs]
        if any(w.is_meta for w in weights):
            raise ShareOptionError(
                f"{name}: allocate='weights' reads the trained weights, and this model has none (meta device); "
                "load its weights first"
            )
        numel = 1
        for d in key[2].weight_shape:
            numel *= d
        if scope == "block" and templates is None:
            numel += key[2].bias_numel  # a hard run at scope "block" shares the bias too (the error is the weights')
        lists.append((run_errors(gram(weights), templates), numel))
    required = math.ceil(before - budget * before)  # the budget is params_after <= budget * before
    chosen = allocate_runs(lists, templates, required)
    if chosen is None:
        most = sum(run_saving(len(convs), numel, templates) for convs, (_, numel) in zip(candidates.values(), lists))
        raise ShareOptionError(
            f"{name}: budget {budget:g} is unreachable; the least this sharing reaches (policy {rule.name}, "
            f"scope {scope}, templates {templates}) is {(before - most) / before:.4f} of the original parameters"
        )
    return {key: list(runs) for key, runs in zip(candidates, chosen.runs)}
