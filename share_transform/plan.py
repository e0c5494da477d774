"""The share plan: which spatial convs of which stage share one weight (analysis, never mutation).

``plan(model)`` runs trace -> shapes -> blocks/stages and returns a :class:`SharePlan`, a plain dataclass
that prints as a per-stage table and converts to and from JSON-ready dicts. ``apply`` (in
``share_transform.apply``) is the one step that ties parameters.

The rule (Boulch, "ShaResNet: reducing residual network parameter number by sharing weights",
arXiv 1702.08782; docs/design.md, The sharing rule): in every stage, the blocks' spatial convs that have the same
input resolution and the same conv signature, and stride 1, point at one shared weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .blocks import ResidualBlock, find_blocks, lost_reductions
from .errors import InputSizeError, NoSpatialConvError, UnknownPolicyError
from .modelinfo import check_input_size, check_model, default_input_size, distinct_conv_weights, model_name
from .policies import POLICIES, Policy
from .signature import ConvSignature
from .text import format_columns
from .trace import propagate_shapes, trace_model

KEPT_STRIDE = "strided"
KEPT_FIRST_BLOCK = "first block of the stage (policy cifar)"
KEPT_UNIQUE = "no other spatial conv of this stage and signature"


@dataclass(frozen=True)
class SpatialConv:
    """The spatial conv of one residual block and what the plan does with it."""

    path: str  # module path of the conv
    block: str  # name of its residual block
    stage: int  # 1-based stage index
    position: int  # 0-based position of its block in the stage
    resolution: tuple[int, int]  # spatial size of the conv's input
    signature: ConvSignature
    group: int | None  # index into SharePlan.groups, None when the conv keeps its own weight
    kept_because: str | None  # why it keeps its own weight (None when it shares)


@dataclass(frozen=True)
class ShareGroup:
    """Spatial convs of one stage that point at one shared weight."""

    stage: int
    resolution: tuple[int, int]  # spatial size of the members' input
    signature: ConvSignature
    members: tuple[str, ...]  # module paths, in the order the model computes them
    numel: int  # elements of the shared weight

    @property
    def saved(self) -> int:
        """Parameters the group saves against a model in which every member has its own weight."""
        return self.numel * (len(self.members) - 1)


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
    ``nn.Conv2d`` weights, before and after applying the plan to the model as it was planned.
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

    @property
    def decrease(self) -> float:
        """Fraction of the parameters the plan removes (0.39 for ResNet-152)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def spatial_convs_removed(self) -> int:
        """Spatial convs that lose their own weight: sum over groups of (members - 1)."""
        return sum(len(g.members) - 1 for g in self.groups)

    @property
    def spatial_convs(self) -> tuple[SpatialConv, ...]:
        return tuple(c for s in self.stages for c in s.spatial_convs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` restores an equal plan."""

        def conv(c: SpatialConv) -> dict[str, Any]:
            return {**c.__dict__, "signature": c.signature.to_dict()}

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
            "groups": [
                {**g.__dict__, "signature": g.signature.to_dict(), "members": list(g.members)} for g in self.groups
            ],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "convs_before": self.convs_before,
            "convs_after": self.convs_after,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharePlan:
        def conv(c: dict[str, Any]) -> SpatialConv:
            return SpatialConv(
                **{**c, "resolution": tuple(c["resolution"]), "signature": ConvSignature.from_dict(c["signature"])}
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
                    signature=ConvSignature.from_dict(g["signature"]),
                    members=tuple(g["members"]),
                    numel=g["numel"],
                )
                for g in d["groups"]
            ),
            params_before=d["params_before"],
            params_after=d["params_after"],
            convs_before=d["convs_before"],
            convs_after=d["convs_after"],
        )

    def __str__(self) -> str:
        size = "x".join(str(s) for s in self.input_size)
        rows = [("stage", "resolution", "blocks", "shared", "shared weight", "params saved")]
        for s in self.stages:
            groups = [g for g in self.groups if g.stage == s.index]
            rows.append(
                (
                    str(s.index),
                    "x".join(str(r) for r in s.resolution),
                    str(len(s.blocks)),
                    f"{sum(c.group is not None for c in s.spatial_convs)}/{len(s.spatial_convs)}",
                    ", ".join(g.signature.describe() for g in groups) or "-",
                    f"{sum(g.saved for g in groups):,}",
                )
            )
        lines = [f'ShaResNet plan for {self.model_name} (policy "{self.policy}", input {size})']
        lines += format_columns(rows, left={1, 4})
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,} (-{100 * self.decrease:.1f}%)")
        lines.append(f"distinct conv weights: {self.convs_before} -> {self.convs_after}")
        return "\n".join(lines)


def check_policy(policy: str, name: str) -> Policy:
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        raise UnknownPolicyError(
            f"{name}: unknown policy {policy!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None


def _stages(blocks: Sequence[ResidualBlock]) -> list[list[ResidualBlock]]:
    """Consecutive blocks with the same output resolution form a stage."""
    stages: list[list[ResidualBlock]] = []
    for b in blocks:
        if not stages or stages[-1][-1].output != b.output:
            stages.append([])
        stages[-1].append(b)
    return stages


def plan(model: nn.Module, policy: str = "imagenet", *, input_size: Sequence[int] | None = None) -> SharePlan:
    """Plan the ShaResNet transform of ``model`` without changing it.

    Args:
        model: a timm or torchvision ResNet / Wide-ResNet / ResNeXt (any residual CNN whose blocks end in
            an ``add``).
        policy: ``"imagenet"`` (default; every stride-1 spatial conv of a stage shares) or ``"cifar"``
            (the first block of every stage keeps its own conv).
        input_size: ``(C, H, W)`` for shape propagation; defaults to the model's own.

    Returns:
        A :class:`SharePlan`; ``print`` it for the per-stage table.

    Raises:
        NotAModuleError, UnknownPolicyError, TraceError, InputSizeError, NoSpatialConvError.

    Example:
        >>> import timm, share_transform
        >>> p = share_transform.plan(timm.create_model("resnet50"))
        >>> p.params_before, p.params_after
        (25557032, 20469800)
    """
    model = check_model(model)
    name = model_name(model)
    rule = check_policy(policy, name)
    size = check_input_size(input_size, name) if input_size is not None else default_input_size(model)
    graph = trace_model(model, name)
    propagate_shapes(model, graph, size, name)
    lost = lost_reductions(graph, model)
    if lost:
        raise InputSizeError(
            f"{name}: input size {'x'.join(map(str, size))} is too small to tell the stages apart (the input of "
            f"the strided conv {lost[0]} is 1 pixel wide). Pass a larger input_size=(C, H, W)."
        )
    blocks = find_blocks(graph, model)
    if not blocks:
        raise NoSpatialConvError(
            f"{name}: found no residual block with a spatial conv, so there is nothing to share. "
            "share_transform works on residual CNNs (ResNet, Wide-ResNet, ResNeXt and their timm variants)."
        )

    # Candidates: stride-1 spatial convs not kept by the policy, grouped by (input resolution, signature).
    stage_blocks = _stages(blocks)
    candidates: dict[tuple[tuple[int, int], ConvSignature], list[str]] = {}
    placed: list[tuple[int, int, ResidualBlock, str | None]] = []
    for s, stage in enumerate(stage_blocks, start=1):
        for position, b in enumerate(stage):
            kept = None
            if not b.signature.is_stride_one:
                kept = KEPT_STRIDE
            elif rule.keep_first_block and position == 0:
                kept = KEPT_FIRST_BLOCK
            else:
                candidates.setdefault((b.conv_input, b.signature), []).append(b.spatial_conv)
            placed.append((s, position, b, kept))

    modules = dict(model.named_modules())
    groups: list[ShareGroup] = []
    group_of: dict[str, int] = {}
    stage_of = {b.spatial_conv: s for s, _, b, _ in placed}
    saved_now = 0
    removed_now = 0
    for (resolution, sig), members in candidates.items():
        if len(members) < 2:
            continue
        weights = [modules[m].weight for m in members]
        distinct = len({id(w) for w in weights})
        saved_now += weights[0].numel() * (distinct - 1)
        removed_now += distinct - 1
        for m in members:
            group_of[m] = len(groups)
        groups.append(ShareGroup(stage_of[members[0]], resolution, sig, tuple(members), weights[0].numel()))

    stages = []
    for s, stage in enumerate(stage_blocks, start=1):
        convs = []
        for _, position, b, kept in (p for p in placed if p[0] == s):
            group = group_of.get(b.spatial_conv)
            reason = kept or (KEPT_UNIQUE if group is None else None)
            convs.append(SpatialConv(b.spatial_conv, b.name, s, position, b.conv_input, b.signature, group, reason))
        stages.append(StagePlan(s, stage[0].output, tuple(b.name for b in stage), tuple(convs)))

    params_before = sum(p.numel() for p in model.parameters())
    convs_before = distinct_conv_weights(model)
    return SharePlan(
        model_name=name,
        policy=rule.name,
        input_size=size,
        stages=tuple(stages),
        groups=tuple(groups),
        params_before=params_before,
        params_after=params_before - saved_now,
        convs_before=convs_before,
        convs_after=convs_before - removed_now,
    )
