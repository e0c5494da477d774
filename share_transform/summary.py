"""The ``sharetx`` report: what sharing changes, per stage and in total.

For every stage of a :class:`~share_transform.planning.SharePlan` (and for the rest of the network: stem,
head, anything outside a residual block) the report gives the parameters before and after sharing, the
decrease, the distinct conv weights before and after, and the bytes the stage's tensors take on disk.
"Before" is the network with every conv owning its weight; "after" stores each shared weight once. The
counts are made on the model itself, so they hold whether it is tied yet or not.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .modelinfo import build_spec
from .planning import KEPT_EXCLUDED, ShareGroup, SharePlan
from .signature import ConvSignature
from .soft import bank_of
from .text import format_columns
from .warmstart import RECONSTRUCTION_ATTR, Reconstruction

__all__ = ["ShareSummary", "summarize"]

REST = "rest"
TOTAL = "total"
#: Names of a soft member's coefficients and bank (``conv.parametrizations.weight.*``).
SOFT_PART = ".parametrizations."


@dataclass(frozen=True)
class StageSummary:
    """One row of the report: a stage, the rest of the network, or the total."""

    label: str  # "1", "2", ... for stages; "rest"; "total"
    resolution: tuple[int, int] | None  # the stage's output size; None for rest and total
    blocks: int
    spatial_convs: int  # layers the scope lets share in its residual blocks (spatial convs at "last", "all")
    spatial_shared: int  # of which point at a shared weight
    params_before: int
    params_after: int
    convs_before: int  # distinct nn.Conv2d weights
    convs_after: int
    bytes_before: int  # bytes of its tensors (parameters and buffers) on disk, unshared
    bytes_after: int  # the same with each shared weight stored once

    @property
    def decrease(self) -> float:
        """Fraction of the row's parameters that sharing removes."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resolution"] = list(self.resolution) if self.resolution else None
        d["decrease"] = round(self.decrease, 6)
        return d


@dataclass(frozen=True)
class ShareSummary:
    """The report for one model; ``print`` it for the table, :meth:`to_dict` for ``--json``."""

    model: str
    source: str | None  # "timm" / "torchvision" when build_model built it
    policy: str
    input_size: tuple[int, int, int]
    stages: tuple[StageSummary, ...]
    rest: StageSummary
    total: StageSummary
    groups: tuple[ShareGroup, ...]
    options: dict[str, Any]  # the plan's sharing options (group_size, scope, templates, budget, exclude)
    describe_options: str  # the options that differ from the paper's, as the header prints them
    file: Path | None = None  # the file written or inspected
    file_bytes: int | None = None  # its size, header included
    excluded: tuple[str, ...] = ()  # spatial convs that keep their own weights because ``exclude`` names them
    # What the warm start lost (``apply`` with init mean, mean-scaled or svd): None otherwise.
    reconstruction: Reconstruction | None = None

    def group_error(self, index: int) -> float | None:
        """The relative reconstruction error of group ``index``, when a warm start measured it."""
        members = self.groups[index].members
        found = self.reconstruction.of_members(members) if self.reconstruction is not None else None
        return found.relative if found is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "policy": self.policy,
            "input_size": list(self.input_size),
            "options": self.options,
            "stages": [s.to_dict() for s in self.stages],
            "rest": self.rest.to_dict(),
            "total": self.total.to_dict(),
            "groups": [
                {
                    "stage": g.stage,
                    "shape": g.signature.describe(),
                    "numel": g.numel,
                    "templates": g.templates,
                    "shares_bias": g.shares_bias,
                    "members": list(g.members),
                    "relative_error": self.group_error(i),
                }
                for i, g in enumerate(self.groups)
            ],
            "reconstruction_error": None
            if self.reconstruction is None
            else {"init": self.reconstruction.init, "total": self.reconstruction.total},
            "file": None if self.file is None else {"path": str(self.file), "bytes": self.file_bytes},
            "excluded": list(self.excluded),
        }

    def __str__(self) -> str:
        head = (
            "stage",
            "resolution",
            "blocks",
            "shared",
            "params before",
            "params after",
            "decrease",
            "conv weights",
            "bytes on disk",
        )
        rows = [head]
        for r in (*self.stages, self.rest, self.total):
            rows.append(
                (
                    r.label,
                    "x".join(map(str, r.resolution)) if r.resolution else "-",
                    str(r.blocks) if r.blocks else "-",
                    f"{r.spatial_shared}/{r.spatial_convs}" if r.spatial_convs else "-",
                    f"{r.params_before:,}",
                    f"{r.params_after:,}",
                    f"{100 * r.decrease:.1f}%",
                    f"{r.convs_before} -> {r.convs_after}",
                    f"{r.bytes_after:,}",
                )
            )
        source = f" ({self.source})" if self.source else ""
        options = self.describe_options
        lines = [
            f"ShaResNet {self.model}{source}, policy {self.policy}, input {'x'.join(map(str, self.input_size))}"
            + (f", {options}" if options else "")
        ]
        lines += format_columns(rows, left={1, 7})  # text columns; numbers align right
        for i, g in enumerate(self.groups):
            members = g.members if len(g.members) <= 3 else (g.members[0], "...", g.members[-1])
            error = self.group_error(i)
            lost = f", relative error {error:.4f}" if error is not None else ""
            kind = "convs" if isinstance(g.signature, ConvSignature) else "linear layers"
            lines.append(f"stage {g.stage}: {g.describe()} for {len(g.members)} {kind} ({', '.join(members)}){lost}")
        if self.reconstruction is not None:
            lines.append(
                f"reconstruction error (init {self.reconstruction.init}): {self.reconstruction.total:.4f} "
                "= ||W - W_shared|| / ||W|| over every shared conv's weight"
            )
        if self.excluded:
            lines.append(f"excluded (keep their own weights): {', '.join(self.excluded)}")
        if self.file is not None:
            lines.append(
                f"file: {self.file} ({self.file_bytes:,} bytes; unshared tensors take {self.total.bytes_before:,})"
            )
        return "\n".join(lines)


def _owner(path: str, owners: dict[str, str]) -> str:
    """The row of a parameter, buffer or module path: its innermost ancestor that is a block, else rest."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        row = owners.get(".".join(parts[:i]))
        if row is not None:
            return row
    return REST


def summarize(model: nn.Module, share_plan: SharePlan, *, file: str | os.PathLike[str] | None = None) -> ShareSummary:
    """The report of ``share_plan`` on ``model`` (tied by it or not), with ``file``'s size when given."""
    owners = {block: str(s.index) for s in share_plan.stages for block in s.blocks}
    labels = [str(s.index) for s in share_plan.stages] + [REST]
    params = dict.fromkeys(labels, 0)
    nbytes = dict.fromkeys(labels, 0)
    convs = dict.fromkeys(labels, 0)
    # remove_duplicate=False: "before" counts a shared weight under every member, as if untied; a soft
    # member counts its weight's shape in place of its coefficients and bank.
    for name, p in model.named_parameters(remove_duplicate=False):
        if SOFT_PART not in name:
            params[_owner(name, owners)] += p.numel()
            nbytes[_owner(name, owners)] += p.numel() * p.element_size()
    for name, b in model.named_buffers(remove_duplicate=False):
        nbytes[_owner(name, owners)] += b.numel() * b.element_size()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            convs[_owner(name, owners)] += 1
        bank = bank_of(m) if isinstance(m, nn.Conv2d | nn.Linear) else None
        if bank is not None:
            params[_owner(name, owners)] += bank.templates[0].numel()
            nbytes[_owner(name, owners)] += bank.templates[0].numel() * bank.templates.element_size()

    modules = dict(model.named_modules())
    saved = dict.fromkeys(labels, 0)
    saved_bytes = dict.fromkeys(labels, 0)
    removed = dict.fromkeys(labels, 0)
    for g in share_plan.groups:
        label = str(g.stage)
        saved[label] += g.saved
        saved_bytes[label] += g.saved * modules[g.members[0]].weight.element_size()
        if isinstance(g.signature, ConvSignature):  # the conv weights column counts convs
            removed[label] += len(g.members) - g.weights

    def row(label: str, resolution: tuple[int, int] | None, blocks: int, spatial: tuple[int, int]) -> StageSummary:
        return StageSummary(
            label=label,
            resolution=resolution,
            blocks=blocks,
            spatial_convs=spatial[0],
            spatial_shared=spatial[1],
            params_before=params[label],
            params_after=params[label] - saved[label],
            convs_before=convs[label],
            convs_after=convs[label] - removed[label],
            bytes_before=nbytes[label],
            bytes_after=nbytes[label] - saved_bytes[label],
        )

    stages = tuple(
        row(
            str(s.index),
            s.resolution,
            len(s.blocks),
            (len(s.spatial_convs), sum(c.group is not None for c in s.spatial_convs)),
        )
        for s in share_plan.stages
    )
    rest = row(REST, None, 0, (0, 0))
    parts = (*stages, rest)
    total = StageSummary(
        label=TOTAL,
        resolution=None,
        blocks=sum(r.blocks for r in parts),
        spatial_convs=sum(r.spatial_convs for r in parts),
        spatial_shared=sum(r.spatial_shared for r in parts),
        params_before=sum(r.params_before for r in parts),
        params_after=sum(r.params_after for r in parts),
        convs_before=sum(r.convs_before for r in parts),
        convs_after=sum(r.convs_after for r in parts),
        bytes_before=sum(r.bytes_before for r in parts),
        bytes_after=sum(r.bytes_after for r in parts),
    )
    spec = build_spec(model)
    path = Path(file) if file is not None else None
    # The warm start's error describes the groups apply shared; another plan's groups differ.
    reconstruction = getattr(model, RECONSTRUCTION_ATTR, None)
    if reconstruction is not None and {g.members for g in reconstruction.groups} != {
        g.members for g in share_plan.groups
    }:
        reconstruction = None
    return ShareSummary(
        model=spec["name"] if spec else share_plan.model_name,
        source=spec["source"] if spec else None,
        policy=share_plan.policy,
        input_size=share_plan.input_size,
        stages=stages,
        rest=rest,
        total=total,
        groups=share_plan.groups,
        options=share_plan.options.to_dict(),
        describe_options=share_plan.describe_options(),
        file=path,
        file_bytes=path.stat().st_size if path is not None else None,
        excluded=tuple(c.path for c in share_plan.spatial_convs if c.kept_because == KEPT_EXCLUDED),
        reconstruction=reconstruction,
    )
