"""The plan's vocabulary, importable without torch: sharing policies, the sharing options, and the init modes of a
shared weight.

The CLI offers these as choices in ``--help``, which must answer without importing torch or timm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import ShareOptionError

__all__ = ["POLICIES", "Policy", "SharingOptions"]

#: Which layers of a block may share, narrowest first: the block's last spatial conv (the paper), every spatial
#: conv of its residual branch, or every conv and linear layer of its residual branch. Each shares a superset
#: of the one before (docs/design.md, Scopes).
SCOPES = ("last", "all", "block")


@dataclass(frozen=True)
class Policy:
    """A sharing policy: which code base to reproduce (the paper's two, or the soft-sharing WRN)."""

    name: str
    keep_first_block: bool  # the first block of every stage keeps its own spatial convs
    description: str
    scope: str = "last"  # the scope when the caller gives none
    needs_templates: bool = False  # a soft-sharing preset: templates=k is required


#: The sharing policies by name. ``imagenet`` is the default.
POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("imagenet", False, "authors' ImageNet code: every stride-1 spatial conv of a stage shares"),
        Policy("cifar", True, "authors' CIFAR code: the first block of every stage keeps its own conv"),
        Policy(
            "swrn",
            True,
            "soft-sharing WRN (Savarese & Maire): after the first block, every 3x3 of a stage mixes one template bank",
            scope="all",
            needs_templates=True,
        ),
    )
}

#: How a shared weight starts: the first member's weight, or the members' mean (a warm start from trained weights).
INITS = ("first", "mean")


def describe_sharing(options: Mapping[str, Any] | None) -> str:
    """Sharing options (``group_size``, ``scope``, ``templates``, ``budget``; absent or None = the paper's) as
    words: ``describe_sharing({"group_size": 2, "templates": 2})`` is ``"group size 2, 2 templates"``."""
    options = options or {}
    parts = []
    if options.get("group_size") is not None:
        parts.append(f"group size {options['group_size']}")
    if options.get("scope") not in (None, "last"):
        parts.append(f"scope {options['scope']}")
    if options.get("templates") is not None:
        parts.append(f"{options['templates']} templates")
    if options.get("budget") is not None:
        parts.append(f"budget {options['budget']:g}")
    return ", ".join(parts)


@dataclass(frozen=True)
class SharingOptions:
    """Where on the sharing dial, between the original network and beyond the paper's ShaResNet.

    All None is the paper's sharing. One frozen value travels from the CLI and the recipes through
    :func:`share_transform.plan`, ``sweep`` and ``apply`` into the plan, files and ``run.json``.

    Attributes:
        group_size: a stage's sharable layers, in the order the model computes them, are cut into consecutive
            runs of this many; each run shares one weight. None = the whole stage (the paper); 1 = no sharing.
        scope: which layers of a block share (:data:`SCOPES`); None = the policy's (``"last"`` except ``swrn``).
        templates: None = hard sharing (one Parameter per run); k >= 1 = soft sharing, a bank of k templates
            per run mixed by per-layer coefficients.
        budget: the least sharing that brings the unique parameters to at most this fraction of the original
            (resolved into ``group_size`` by the plan, which records both).

    Example:
        >>> SharingOptions(group_size=2, templates=2).describe()
        'group size 2, 2 templates'
    """

    group_size: int | None = None
    scope: str | None = None
    templates: int | None = None
    budget: float | None = None

    def check(self, name: str, rule: Policy) -> SharingOptions:
        """These options with the scope resolved (the policy's when None), after checking them against each other
        and ``rule``.

        Raises:
            ShareOptionError: one line naming ``name``, the option that is wrong and what it takes.
        """

        def positive_int(value: object, option: str, none_means: str) -> None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ShareOptionError(
                    f"{name}: {option} must be an integer >= 1 (or None: {none_means}), got {value!r}"
                )

        positive_int(self.group_size, "group_size", "the whole stage")
        positive_int(self.templates, "templates", "hard sharing")
        if self.scope is not None and self.scope not in SCOPES:
            raise ShareOptionError(f"{name}: unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        budget = self.budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
                raise ShareOptionError(
                    f"{name}: budget is a fraction of the original parameters in (0, 1], got {budget!r}"
                )
            if self.group_size is not None:
                raise ShareOptionError(
                    f"{name}: give budget or group_size, not both (the budget chooses the group size)"
                )
        if rule.needs_templates and self.templates is None:
            raise ShareOptionError(
                f"{name}: policy {rule.name!r} is soft sharing; give templates=k (k >= 1 templates per stage)"
            )
        return replace(self, scope=self.scope if self.scope is not None else rule.scope)

    def to_dict(self) -> dict[str, Any]:
        """``{"group_size", "scope", "templates", "budget"}``: what ``run.json`` and a plan's JSON record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SharingOptions:
        """The options a :meth:`to_dict` (or an older record lacking some keys) holds; unknown keys are ignored."""
        d = d or {}
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})

    def describe(self) -> str:
        """The options that differ from the paper's, in words (empty for the paper's)."""
        return describe_sharing(self.to_dict())
