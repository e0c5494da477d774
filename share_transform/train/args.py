"""The command-line flags both recipes share, so ``train_imagenet.py`` and ``train_cifar.py`` read alike.

A recipe's ``get_args_parser()`` adds its data flags, then calls :func:`add_training_args` with its
protocol defaults (docs/design.md, Training protocols), and :func:`resolve_args` after parsing.

Flags: ``--arch``, ``--model-kwargs``, ``--share/--no-share``, ``--policy``, the sharing options
``--group-size``, ``--scope``, ``--templates``, ``--budget``, ``--exclude`` (see :func:`share_transform.plan`),
``--init``, ``--classifier-init``, ``--epochs``, ``--batch-size`` (global), ``--lr`` (per
``--lr-reference-batch`` images), ``--momentum``,
``--weight-decay``, ``--lr-milestones``, ``--lr-gamma``, ``--workers``, ``--output``, ``--resume``,
``--device``, ``--amp/--no-amp``, ``--channels-last/--no-channels-last``, ``--compile``,
``--synthetic``, ``--deterministic``, ``--seed``, ``--print-freq``.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> parser.add_argument("--data")
    >>> add_training_args(parser, arch="resnet50", epochs=90, batch_size=256, lr=0.1, lr_reference_batch=256,
    ...                   weight_decay=1e-4, milestones=(30, 60), gamma=0.1, policy="imagenet", init="fan_out",
    ...                   model_kwargs_example='{"layers": [2, 2, 2, 2]}')
    >>> args = resolve_args(parser.parse_args(), recipe="imagenet")
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch

from ..build import check_model_kwargs
from ..init import MODES
from ..policies import SharingOptions
from .errors import ConfigError

#: ``--classifier-init`` choices: torch's default draw of a linear layer, or He-normal (the soft-sharing WRN's).
CLASSIFIER_INITS = ("uniform", "he")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The recipes' ``--help``: each default stated once.

    A help text that already says its default (``default 90``, ``default: cuda if present``) keeps its own
    words; one that does not gets ``(default: X)``; flags and defaults decided later (``None``) get nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unstated = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unstated or not action.option_strings:  # `is False`: a default of 0 is stated
            return text
        return f"{text} (default: %(default)s)".lstrip()


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    arch: str,
    epochs: int,
    batch_size: int,
    lr: float,
    lr_reference_batch: int,
    momentum: float = 0.9,
    weight_decay: float,
    milestones: Sequence[int],
    gamma: float,
    policy: str,
    init: str,
    workers: int = 8,
    model_kwargs_example: str,
) -> argparse.ArgumentParser:
    """Add the shared flags to ``parser`` with the recipe's protocol defaults; returns ``parser``.

    ``model_kwargs_example`` is the ``--model-kwargs`` JSON the help shows: arguments the default ``arch`` takes.
    """
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default=arch, help="timm name, or torchvision:NAME")
    g.add_argument(
        "--model-kwargs",
        default="{}",
        type=_json_object,
        help=f"JSON of extra constructor arguments, e.g. '{model_kwargs_example}' for {arch} (advanced)",
    )
    g.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share one spatial conv weight per stage (ShaResNet; default); --no-share trains the original",
    )
    g.add_argument("--policy", default=policy, help="sharing policy: imagenet, cifar or swrn")
    g.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="spatial convs per shared weight, in runs along each stage (default: the whole stage)",
    )
    g.add_argument(
        "--scope",
        default=None,
        help="last: each block's last spatial conv; all: every spatial conv of the residual branch; block: every "
        "conv and linear layer of it, weight and bias (default: the policy's)",
    )
    g.add_argument(
        "--templates", type=int, default=None, help="soft sharing: template bank size per group (default: hard)"
    )
    g.add_argument(
        "--budget",
        type=float,
        default=None,
        help="unique parameters at most this fraction of the original: picks the least sharing that fits",
    )
    g.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="PATTERN",
        help="module path or glob (stages.2.*) whose spatial convs keep their own weights; repeatable",
    )
    g.add_argument("--init", default=init, choices=MODES, help="conv init, He et al.")
    g.add_argument(
        "--classifier-init",
        default=None,
        choices=CLASSIFIER_INITS,
        help="linear classifier's weight: uniform (torch's and Torch7's U(-1/sqrt(in), 1/sqrt(in))) or he "
        "(He-normal, N(0, sqrt(2/in))); default: uniform, he under the CIFAR recipe's --policy swrn",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs to train")
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help="global batch over all ranks",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=lr,
        help=f"learning rate per {lr_reference_batch} images, scaled linearly with --batch-size",
    )
    g.add_argument("--lr-reference-batch", type=int, default=lr_reference_batch, help=argparse.SUPPRESS)
    g.add_argument("--momentum", type=float, default=momentum, help="Nesterov momentum")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=weight_decay,
        help="on every parameter",
    )
    g.add_argument(
        "--lr-milestones",
        type=int,
        nargs="*",
        default=list(milestones),
        help="epochs after which lr *= --lr-gamma",
    )
    g.add_argument("--lr-gamma", type=float, default=gamma, help="lr factor at each milestone")

    g = parser.add_argument_group("run")
    g.add_argument("--output", type=Path, default=None, help="run directory (default runs/RECIPE-ARCH-shared|original)")
    g.add_argument("--resume", action="store_true", help="continue from the output directory's last checkpoint")
    g.add_argument("--workers", type=int, default=workers, help="data loader processes per rank")
    g.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=("cuda", "cpu"),
        help="default: cuda if present",
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for cuda)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format (default: on for cuda)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g.add_argument(
        "--synthetic", action="store_true", help="random images instead of --data (benchmarking; a short epoch)"
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: bit-reproducible runs and resumes",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds the model's init, the data order and augmentation")
    g.add_argument("--print-freq", type=int, default=20, help="steps between progress updates and NaN checks")
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def resolve_args(args: argparse.Namespace, *, recipe: str) -> argparse.Namespace:
    """Fill the device-dependent defaults and the output directory; check values that argparse cannot.

    Raises:
        ConfigError: a value out of its range (see :data:`RANGES`), or ``--model-kwargs`` outside
            :data:`share_transform.build.MODEL_KWARGS`.
    """
    if args.amp is None:
        args.amp = args.device == "cuda"
    if args.classifier_init is None:
        args.classifier_init = "uniform"
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"
    if args.output is None:
        arch = args.arch.replace(":", "-").replace("/", "-")
        args.output = Path("runs") / f"{recipe}-{arch}-{'shared' if args.share else 'original'}"
    _check_ranges(args)
    check_model_kwargs(args.model_kwargs, where="--model-kwargs", error=ConfigError)
    if "num_classes" in args.model_kwargs:
        raise ConfigError("--model-kwargs: num_classes is set by the dataset, not by --model-kwargs")
    given = [flag for flag in SHARING_FLAGS if getattr(args, flag) is not None]
    if given and not args.share:
        raise ConfigError(f"--{given[0].replace('_', '-')} is a sharing option; it needs --share")
    return args


#: Flag -> (low, high, whether low itself is allowed); every value must be finite and at most high, except
#: momentum, which is Nesterov's: 0 < momentum < 1. ``img_size`` is the ImageNet recipe's, ``val_split`` and
#: ``cutout`` the CIFAR recipe's.
RANGES: dict[str, tuple[float, float, bool]] = {
    "epochs": (1, math.inf, True),
    "batch_size": (1, math.inf, True),
    "print_freq": (1, math.inf, True),
    "workers": (0, math.inf, True),
    "lr": (0, math.inf, False),
    "lr_reference_batch": (1, math.inf, True),
    "momentum": (0, 1, False),
    "weight_decay": (0, math.inf, True),
    "lr_gamma": (0, math.inf, False),
    "img_size": (1, math.inf, True),
    "val_split": (0, math.inf, True),
    "cutout": (0, math.inf, True),
    "seed": (0, 2**63 - 1, True),
}


def _check_ranges(args: argparse.Namespace) -> None:
    for name, (low, high, low_ok) in RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        above_low = low <= value if low_ok else low < value
        below_high = value < high if name == "momentum" else value <= high
        if not (above_low and below_high and math.isfinite(value)):
            text = f"at least {low:g}" if low_ok else f"above {low:g}"
            if high != math.inf:
                text += f" and {'below' if name == 'momentum' else 'at most'} {high:g}"
            raise ConfigError(f"--{name.replace('_', '-')} must be {text}, got {value}")
    if any(m < 0 for m in args.lr_milestones):
        raise ConfigError(f"--lr-milestones must be epochs (0 or more), got {' '.join(map(str, args.lr_milestones))}")


#: The sharing options both recipes take, one flag each, as :class:`share_transform.SharingOptions` names them.
#: ``allocate="weights"`` reads trained weights, and the recipes train from scratch: they keep "uniform".
SHARING_FLAGS = tuple(f.name for f in fields(SharingOptions) if f.name != "allocate")


def sharing_options(args: argparse.Namespace) -> SharingOptions | None:
    """The sharing options of a run as given (None for an unshared run)."""
    return SharingOptions(**{flag: getattr(args, flag) for flag in SHARING_FLAGS}) if args.share else None
