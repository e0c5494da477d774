"""The plan's vocabulary, importable without torch: sharing policies, the sharing options, and the init modes of a
shared weight.

The CLI offers these as choices in ``--help``, which must answer without importing torch or timm.
:func:`register_policy` adds a policy to the built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import RegistrationError, ShareOptionError

__all__ = ["POLICIES", "Policy", "SharingOptions", "register_policy"]

#: Which layers of a block may share, narrowest first: the block's last spatial conv (the paper), every spatial
#: conv of its residual branch, or every conv and linear layer of its residual branch. Each shares a superset
#: of the one before (docs/design.md, Scopes).
SCOPES = ("last", "all", "block")
#: How a budget is spread over a stage: runs of one length (``uniform``), or the runs whose trained weights lose
#: least when shared (``weights``, share_transform.allocate).
ALLOCATIONS = ("uniform", "weights")


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


def register_policy(
    name: str,
    *,
    keep_first_block: bool,
    description: str,
    scope: str = "last",
    needs_templates: bool = False,
    replace: bool = False,
) -> Policy:
    """Add a sharing policy to :data:`POLICIES`, for :func:`share_transform.plan`, ``apply`` and ``sweep``.

    A policy says which spatial convs of a stage may share: with ``keep_first_block`` the first block of every
    stage keeps its own (the authors' CIFAR code), ``scope`` is the scope when the caller gives none, and
    ``needs_templates`` makes ``templates=k`` required (a soft-sharing preset). The ``sharetx`` CLI offers the
    policies registered when it runs: the built-in ones, plus any registered before ``main()`` is called from
    Python. A plan records its policy by name, so a file planned with a registered policy loads where the same
    policy is registered.

    Args:
        name: the policy's name, a single word (``[A-Za-z0-9_-]``): what ``policy=`` and ``--policy`` take.
        keep_first_block: the first block of every stage keeps its own spatial convs.
        description: one line, for ``--help`` and the docs.
        scope: ``"last"`` (the block's last spatial conv) or ``"all"`` (every spatial conv of the branch).
        needs_templates: soft sharing only: ``templates=k`` is required.
        replace: replace a policy of that name (a built-in one included).

    Returns:
        The registered :class:`Policy`.

    Raises:
        RegistrationError: ``name`` is taken (and ``replace`` is False), or is not a single word; ``scope`` is
            not one of :data:`SCOPES`.

    Example:
        >>> every = register_policy("every-block", keep_first_block=False, scope="all",
        ...                         description="every stride-1 spatial conv of the residual branch shares")
        >>> share_transform.plan(timm.create_model("resnet34"), "every-block").scope
        'all'
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise RegistrationError(f"register_policy: a policy name is one word of letters, digits, _ and -, got {name!r}")
    if name in POLICIES and not replace:
        raise RegistrationError(f"register_policy: policy {name!r} exists; pass replace=True to replace it")
    if scope not in SCOPES:
        raise RegistrationError(f"register_policy: unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    policy = Policy(name, bool(keep_first_block), str(description), scope=scope, needs_templates=bool(needs_templates))
    POLICIES[name] = policy
    return policy


#: How a shared weight starts: the first member's weight (from scratch), or a warm start from trained weights:
#: the members' mean, their mean compared up to a per-channel scale (folded into the following BatchNorm), or
#: for soft groups the members' best rank-k approximation (share_transform.warmstart).
INITS = ("first", "mean", "mean-scaled", "svd")


def describe_sharing(options: Mapping[str, Any] | None) -> str:
    """Sharing options (``group_size``, ``scope``, ``templates``, ``budget``, ``exclude``, ``allocate``; absent or
    None = the paper's) as words: ``describe_sharing({"group_size": 2, "templates": 2})`` is
    ``"group size 2, 2 templates"``."""
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
    if options.get("exclude"):
        parts.append(f"exclude {' '.join(options['exclude'])}")
    if options.get("allocate") not in (None, "uniform"):
        parts.append(f"allocated by {options['allocate']}")
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
        allocate: how ``budget`` is spread (:data:`ALLOCATIONS`): ``"uniform"`` (default), runs of one
            ``group_size``; ``"weights"``, the consecutive runs of any lengths whose trained weights lose least
            when shared (the least total reconstruction error: :mod:`share_transform.allocate`, exact); the plan
            records the runs as its groups.
        exclude: module paths or glob patterns (``fnmatch`` on the module path, ``*`` crossing dots) whose spatial
            convs keep their own weights, as Torch-Pruning's ``ignored_layers``: a conv is excluded when its path,
            or the path of a module holding it, matches one (``"layer4"``, ``"layer4.*"``, ``"layer3.2"``,
            ``"*.conv2"``). A pattern that matches no module of the model is an error. A list is kept as a tuple.

    Example:
        >>> SharingOptions(group_size=2, templates=2).describe()
        'group size 2, 2 templates'
        >>> SharingOptions(exclude=["layer4.*"]).exclude
        ('layer4.*',)
    """

    group_size: int | None = None
    scope: str | None = None
    templates: int | None = None
    budget: float | None = None
    exclude: tuple[str, ...] = ()
    allocate: str = "uniform"

    def __post_init__(self) -> None:
        # One spelling per value, so that equal options compare (and hash) equal: a list (JSON, argparse's
        # append) becomes a tuple, None (an unset flag) the empty tuple. Anything else is left for check().
        if self.exclude is None or isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude or ()))

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
        if self.allocate not in ALLOCATIONS:
            raise ShareOptionError(
                f"{name}: unknown allocate {self.allocate!r}; choose one of {', '.join(ALLOCATIONS)}"
            )
        if self.allocate == "weights" and budget is None:
            raise ShareOptionError(
                f"{name}: allocate='weights' chooses the runs that lose least under a budget; give budget=fraction"
            )
        if not isinstance(self.exclude, tuple) or not all(isinstance(p, str) and p for p in self.exclude):
            raise ShareOptionError(
                f"{name}: exclude takes a list of module paths or glob patterns (exclude=['layer4.*']), "
                f"got {self.exclude!r}"
            )
        if rule.needs_templates and self.templates is None:
            raise ShareOptionError(
                f"{name}: policy {rule.name!r} is soft sharing; give templates=k (k >= 1 templates per stage)"
            )
        return replace(self, scope=self.scope if self.scope is not None else rule.scope)

    def to_dict(self) -> dict[str, Any]:
        """``{"group_size", "scope", "templates", "budget", "exclude"}`` (``exclude`` as a list), and ``"allocate"``
        unless it is ``"uniform"``: what ``run.json`` and a plan's JSON record (a record of a uniform allocation
        stays as it was before allocate)."""
        d = {**asdict(self), "exclude": list(self.exclude)}
        if d["allocate"] == "uniform":
            del d["allocate"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SharingOptions:
        """The options a :meth:`to_dict` (or an older record lacking some keys: no ``exclude`` is none) holds;
        unknown keys are ignored."""
        d = d or {}
        # Absent or None: the field's default (no exclude is none; records older than allocate are "uniform").
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})

    def describe(self) -> str:
        """The options that differ from the paper's, in words (empty for the paper's)."""
        return describe_sharing(self.to_dict())
