"""Import a soft-sharing WRN trained by the reference code (Savarese & Maire, lolemacs/soft-sharing).

The reference's ``SWRN(depth, width, num_templates, num_classes)`` (``models/swrn.py``, ``models/layers.py``) holds,
per stage ``s`` of ``n = (depth - 4) / 6`` blocks, one ``TemplateBank`` ``bank_s.templates`` of shape
``(k, 16w*2^(s-1), same, 3, 3)``, and in blocks ``1..n-1`` of ``stage_s`` two ``SConv2d``\\ s, each with its own
``coefficients`` of shape ``(k, 1, 1, 1, 1)`` and the bank again as a submodule (``...conv1.bank.templates``, an
alias of ``bank_s.templates``); a member's weight is ``(templates * coefficients).sum(0)``. Block 0 of each stage
keeps plain convs and its 1x1 ``convShortcut``; the head is ``lastact`` (BatchNorm, ReLU), 8x8 average pooling and
``classifier``. A ``DataParallel`` checkpoint prefixes every name with ``module.``.

That is, layer for layer, share_transform's ``wrn_<depth>_<width>`` under policy ``swrn`` with ``templates=k``
(members in the order the model computes them, both 3x3s of blocks 2..n of each stage): :func:`import_swrn`
builds it and copies the reference's tensors in, after checking every name and shape, and that every alias of a
bank holds the bank's bytes.

Example:
    >>> state = share_transform.read_checkpoint("swrn28-10-2.pth")  # torch.save(checkpoint["state_dict"], ...)
    >>> model = import_swrn(state)                                  # wrn_28_10, swrn, 2 templates
    >>> share_transform.save(model, "swrn28-10-2.safetensors")
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .build import build_model
from .checkpoints import load_weights
from .errors import CheckpointError
from .tie import apply, get_plan

__all__ = ["import_swrn"]  # the package exports it; SwrnLayout and swrn_layout are imported from here

_BANK = re.compile(r"bank_([123])\.templates")
_STAGE = re.compile(r"stage_([123])\.(\d+)\.(.+)")
_BLOCK_PART = re.compile(r"(bn1|bn2)\.(\w+)|(conv1|conv2)\.(weight|coefficients|bank\.templates)|convShortcut\.weight")
#: The reference's head, and share_transform's names for it.
_HEAD = {"conv_3x3.": "stem.", "lastact.0.": "norm.", "classifier.": "fc."}


@dataclass(frozen=True)
class SwrnLayout:
    """The architecture a reference checkpoint holds, read from its names and shapes."""

    depth: int
    width: int
    templates: int
    num_classes: int

    @property
    def arch(self) -> str:
        """share_transform's name for the network: ``wrn_<depth>_<width>``."""
        return f"wrn_{self.depth}_{self.width}"


def _strip_wrapper(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names without ``DataParallel``'s ``module.`` prefix, when every name has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def swrn_layout(state: Mapping[str, torch.Tensor]) -> SwrnLayout:
    """Depth, width, templates and classes of a reference SWRN state dict.

    Raises:
        CheckpointError: the names or shapes are not the reference's SWRN layout (the message says what is off).
    """
    state = _strip_wrapper(state)
    banks = {int(m[1]): state[k] for k in state if (m := _BANK.fullmatch(k))}
    if sorted(banks) != [1, 2, 3] or "classifier.weight" not in state:
        raise CheckpointError(
            "not a soft-sharing WRN checkpoint of the reference code: expected bank_1.templates, bank_2.templates, "
            f"bank_3.templates and classifier.weight, found {', '.join(sorted(state)[:4]) or 'no tensors'}..."
        )
    shapes = {s: tuple(b.shape) for s, b in banks.items()}
    k, width16 = shapes[1][0], shapes[1][1]
    for s, shape in shapes.items():
        c = width16 * 2 ** (s - 1)
        if shape != (k, c, c, 3, 3):
            raise CheckpointError(
                f"bank_{s}.templates has shape {list(shape)}; a reference SWRN's is [k, C, C, 3, 3] with C = "
                f"{c} for this width"
            )
    if width16 % 16:
        raise CheckpointError(f"bank_1.templates has {width16} channels, not a multiple of 16 (16 x width)")
    blocks = 1 + max((int(m[2]) for k in state if (m := _STAGE.fullmatch(k)) and m[1] == "1"), default=-1)
    if blocks < 2:
        raise CheckpointError(
            f"the checkpoint has {blocks} block(s) a stage: a reference SWRN needs 2 or more for its banks to be used"
        )
    return SwrnLayout(
        depth=6 * blocks + 4, width=width16 // 16, templates=k, num_classes=state["classifier.weight"].shape[0]
    )


def _our_name(name: str) -> str:
    """share_transform's state-dict name of the reference's ``name``.

    Raises:
        CheckpointError: a name the reference's SWRN does not have.
    """
    for theirs, ours in _HEAD.items():
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    m = _STAGE.fullmatch(name)
    if m is None or _BLOCK_PART.fullmatch(m[3]) is None:
        raise CheckpointError(f"{name!r} is not a name of the reference's SWRN")
    stage, block, part = int(m[1]) - 1, m[2], m[3]
    if part == "convShortcut.weight":
        part = "shortcut.weight"
    elif part.endswith(".coefficients"):
        part = part.replace(".coefficients", ".parametrizations.weight.original")
    elif part.endswith(".bank.templates"):
        part = part.replace(".bank.templates", ".parametrizations.weight.0.bank.templates")
    return f"stages.{stage}.{block}.{part}"


def import_swrn(state: Mapping[str, torch.Tensor]) -> nn.Module:
    """share_transform's soft-shared WRN holding the weights of a reference SWRN state dict.

    The model is ``wrn_<depth>_<width>`` with ``num_classes`` from the classifier, shared with policy ``swrn`` and
    ``templates=k``; its forward is the reference network's. Save it with :func:`share_transform.save`.

    Raises:
        CheckpointError: not the reference's layout; a name or shape that does not fit; a bank alias
            (``stage_s.b.convc.bank.templates``) that differs from ``bank_s.templates``.

    Example:
        >>> model = import_swrn(torch.load("swrn.pth", weights_only=True))
    """
    state = _strip_wrapper(state)
    layout = swrn_layout(state)
    model = build_model(layout.arch, num_classes=layout.num_classes)
    apply(model, "swrn", templates=layout.templates)
    plan = get_plan(model)
    assert plan is not None  # two or more blocks a stage: swrn shares blocks 2..n of each stage
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if (m := _BANK.fullmatch(name)) is not None:
            # The bank's own name in share_transform: the first member's (the others are aliases of it).
            first = plan.groups[int(m[1]) - 1].members[0]
            ours[f"{first}.parametrizations.weight.0.bank.templates"] = tensor
        elif name.endswith(".coefficients"):
            ours[_our_name(name)] = tensor.reshape(-1)  # (k, 1, 1, 1, 1) -> share_transform's (k,)
        else:
            ours[_our_name(name)] = tensor
    # A member's bank alias and bank_s.templates land on one name each: load_weights checks they agree.
    aliases = {n for n in state if n.endswith(".bank.templates")}
    for name in sorted(aliases):
        stage = int(name.split(".")[0].removeprefix("stage_"))
        if not torch.equal(state[name], state[f"bank_{stage}.templates"]):
            raise CheckpointError(f"{name} differs from bank_{stage}.templates, which it aliases in the reference")
    # PyTorch 0.4.0, the reference's, had no BatchNorm num_batches_tracked: such checkpoints keep the model's zeros.
    for name, tensor in model.state_dict().items():
        if name.endswith(".num_batches_tracked"):
            ours.setdefault(name, tensor)
    load_weights(model, ours, source="reference SWRN checkpoint")
    return model
