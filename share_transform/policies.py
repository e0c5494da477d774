"""The plan's vocabulary, importable without torch: sharing policies and init modes of a shared weight.

The CLI offers these as choices in ``--help``, which must answer without importing torch or timm.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INITS", "POLICIES", "Policy"]


@dataclass(frozen=True)
class Policy:
    """A sharing policy: which of the authors' two code bases to reproduce."""

    name: str
    keep_first_block: bool  # the first block of every stage keeps its own spatial conv
    description: str


#: The sharing policies by name. ``imagenet`` is the default.
POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("imagenet", False, "authors' ImageNet code: every stride-1 spatial conv of a stage shares"),
        Policy("cifar", True, "authors' CIFAR code: the first block of every stage keeps its own conv"),
    )
}

#: How a shared weight starts: the first member's weight, or the members' mean (a warm start from trained weights).
INITS = ("first", "mean")
