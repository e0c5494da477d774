"""The plan's vocabulary, importable without torch: sharing policies and init modes of a shared weight.

The CLI offers these as choices in ``--help``, which must answer without importing torch or timm.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INITS", "POLICIES", "SCOPES", "Policy"]

#: Which spatial convs of a block may share: the block's last one (the paper), or all of its residual branch.
SCOPES = ("last", "all")


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
