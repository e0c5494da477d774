"""The plan's vocabulary, importable without torch: sharing policies and init modes of a shared weight.

The CLI offers these as choices in ``--help``, which must answer without importing torch or timm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ShareOptionError

__all__ = ["INITS", "POLICIES", "SCOPES", "Policy", "check_options", "describe_sharing"]

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


def check_options(
    name: str,
    rule: Policy,
    *,
    group_size: int | None,
    scope: str | None,
    templates: int | None,
    budget: float | None,
) -> str:
    """Check the sharing options against each other and ``rule``; returns the scope to use.

    Raises:
        ShareOptionError: one line saying which option is wrong and what it takes.
    """

    def positive_int(value: object, option: str, none_means: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ShareOptionError(f"{name}: {option} must be an integer >= 1 (or None: {none_means}), got {value!r}")

    positive_int(group_size, "group_size", "the whole stage")
    positive_int(templates, "templates", "hard sharing")
    if scope is not None and scope not in SCOPES:
        raise ShareOptionError(f"{name}: unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
            raise ShareOptionError(f"{name}: budget is a fraction of the original parameters in (0, 1], got {budget!r}")
        if group_size is not None:
            raise ShareOptionError(f"{name}: give budget or group_size, not both (the budget chooses the group size)")
    if rule.needs_templates and templates is None:
        raise ShareOptionError(
            f"{name}: policy {rule.name!r} is soft sharing; give templates=k (k >= 1 templates per stage)"
        )
    return scope if scope is not None else rule.scope
