"""The command-line flags both recipes share, so ``train_imagenet.py`` and ``train_cifar.py`` read alike.

A recipe's ``get_args_parser()`` adds its data flags, then calls :func:`add_training_args` with its
protocol defaults (docs/design.md, Training protocols), and :func:`resolve_args` after parsing.

Flags: ``--arch``, ``--model-kwargs``, ``--share/--no-share``, ``--policy``, the sharing options
``--group-size``, ``--scope``, ``--templates``, ``--budget``, ``--exclude``, ``--allocate`` (see
:func:`share_transform.plan`), ``--init``, ``--classifier-init``, ``--epochs``, ``--batch-size`` (global), ``--lr``
(per ``--lr-reference-batch`` images), ``--momentum``, ``--weight-decay``, ``--schedule``, ``--lr-milestones``,
``--lr-gamma``, ``--warmup-epochs``; a trained original and distillation: ``--pretrained``, ``--pretrained-path``,
``--from-checkpoint``, ``--distill``, ``--kd-temperature``, ``--kd-alpha``, ``--recalibrate-bn``,
``--evaluate-first``; ``--workers``, ``--output``, ``--resume``, ``--device``, ``--amp/--no-amp``,
``--channels-last/--no-channels-last``, ``--compile``, ``--synthetic``, ``--deterministic``, ``--seed``,
``--print-freq``.

Defaults that depend on other flags are None until :func:`resolve_args` fills them: ``--epochs``, ``--lr``,
``--lr-milestones`` and ``--lr-gamma`` (the recipe's protocol, or :data:`FINETUNE`'s under ``--schedule
finetune``), ``--init`` (the recipe's He init, or a warm start from a trained original), the KD flags.

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..build import check_model_kwargs
from ..init import MODES
from ..policies import ALLOCATIONS, SharingOptions
from .errors import ConfigError

#: ``--classifier-init`` choices: torch's default draw of a linear layer, or He-normal (the soft-sharing WRN's).
CLASSIFIER_INITS = ("uniform", "he")
#: ``--init`` values that start the shared model from a trained original's weights (``share_transform.apply``'s
#: warm starts; docs/design.md, Warm starts); the others (:data:`share_transform.init.MODES`) train from scratch.
WARM_STARTS = ("mean", "mean-scaled", "svd")
#: ``--schedule`` choices: the recipe's step decay (the paper's), or :data:`FINETUNE`.
SCHEDULES = ("step", "finetune")


@dataclass(frozen=True)
class FinetunePreset:
    """``--schedule finetune``: a short schedule for a model that starts trained (a warm start).

    * lr: the recipe's from-scratch lr / ``lr_divisor``. Caffe's fine-tuning example
      (``models/finetune_flickr_style/solver.prototxt``: "lr for fine-tuning should be lower than when starting
      from scratch") trains at ``base_lr`` 0.001, a tenth of the 0.01 its ImageNet model
      (``bvlc_reference_caffenet``) trained with.
    * epochs: ``epochs_fraction`` x the recipe's: the same example runs 100,000 iterations against the 450,000 of
      the ImageNet training it starts from (2/9): 20 epochs for ImageNet's 90, 44 for CIFAR's 200.
    * shape: ``warmup_epochs`` of linear warm-up, then a half cosine to 0, updated every step (Hugging Face
      transformers' ``get_cosine_schedule_with_warmup``; timm's ``--sched cosine --warmup-epochs`` with
      ``--sched-on-updates``).
    """

    lr_divisor: float = 10.0
    epochs_fraction: float = 100_000 / 450_000
    warmup_epochs: float = 1.0

    def epochs(self, scratch_epochs: int) -> int:
        return max(1, round(scratch_epochs * self.epochs_fraction))


FINETUNE = FinetunePreset()
#: ``--kd-temperature`` and ``--kd-alpha`` defaults: RepDistiller's (Tian et al., "Contrastive Representation
#: Distillation", ICLR 2020, github.com/HobbitLong/RepDistiller), the KD baseline of its CIFAR-100 benchmark:
#: ``train_student.py --kd_T 4`` and ``--distill kd -r 0.1 -a 0.9`` (cross-entropy weight 0.1, KD weight 0.9).
KD_TEMPERATURE = 4.0
KD_ALPHA = 0.9


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


#: Where :func:`add_training_args` leaves the recipe's protocol for :func:`resolve_args` (removed by it).
_PROTOCOL = "recipe_protocol"


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
    parser.set_defaults(
        **{_PROTOCOL: {"epochs": epochs, "lr": lr, "milestones": list(milestones), "gamma": gamma, "init": init}}
    )
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
    g.add_argument(
        "--allocate",
        default=None,
        choices=ALLOCATIONS,
        help="how --budget is spread over a stage: uniform runs (default), or weights: the runs whose trained "
        "weights lose least when shared (needs a warm start --init from a trained original)",
    )
    g.add_argument(
        "--init",
        default=None,
        choices=MODES + WARM_STARTS,
        help=f"how the model starts: {' or '.join(MODES)} (He et al.: from scratch), or from the trained original "
        f"(--pretrained, --from-checkpoint) shared with a warm start: {', '.join(WARM_STARTS)} (svd for "
        f"--templates); default {init}, and mean (svd with --templates) when a trained original is given",
    )
    g.add_argument(
        "--classifier-init",
        default=None,
        choices=CLASSIFIER_INITS,
        help="linear classifier's weight: uniform (torch's and Torch7's U(-1/sqrt(in), 1/sqrt(in))) or he "
        "(He-normal, N(0, sqrt(2/in))); default: uniform, he under the CIFAR recipe's --policy swrn",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs to train (default {epochs}; {FINETUNE.epochs(epochs)} under --schedule finetune)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help="global batch over all ranks",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate per {lr_reference_batch} images, scaled linearly with --batch-size (default {lr:g}; "
        f"{lr / FINETUNE.lr_divisor:g} under --schedule finetune)",
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
        "--schedule",
        default="step",
        choices=SCHEDULES,
        help="step: lr x --lr-gamma after each of --lr-milestones (the paper's); finetune: a short schedule for a "
        f"warm start, lr / {FINETUNE.lr_divisor:g}, {FINETUNE.warmup_epochs:g} epoch of linear warm-up then a "
        "cosine to 0, updated every step (docs/training.md)",
    )
    g.add_argument(
        "--lr-milestones",
        type=int,
        nargs="*",
        default=None,
        help=f"step schedule: epochs after which lr *= --lr-gamma (default {' '.join(map(str, milestones))})",
    )
    g.add_argument(
        "--lr-gamma", type=float, default=None, help=f"step schedule: lr factor at each milestone (default {gamma:g})"
    )
    g.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help=f"finetune schedule: epochs of linear warm-up (default {FINETUNE.warmup_epochs:g})",
    )

    g = parser.add_argument_group("trained original and distillation (docs/training.md, Compress a trained model)")
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="the trained original is --arch with timm's pretrained weights (downloaded from the hub, or read "
        "from --pretrained-path); its classifier must predict the data's classes",
    )
    g.add_argument(
        "--pretrained-path",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --pretrained: read FILE as timm's pretrained weights (timm's pretrained_cfg_overlay="
        "dict(file=FILE), as timm's train.py --pretrained-path) instead of the hub",
    )
    g.add_argument(
        "--from-checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="the trained original is --arch with these weights: a .safetensors or .pth file, timm train.py's "
        ".pth.tar, or a run directory of these recipes (its checkpoint-best)",
    )
    g.add_argument(
        "--distill",
        action="store_true",
        help="knowledge distillation: the loss is --kd-alpha x the KL divergence to the trained original's "
        "softened outputs (x T^2) + (1 - --kd-alpha) x cross-entropy (Hinton et al. 2015)",
    )
    g.add_argument(
        "--kd-temperature",
        type=float,
        default=None,
        metavar="T",
        help=f"--distill: softmax temperature (default {KD_TEMPERATURE:g}, RepDistiller's)",
    )
    g.add_argument(
        "--kd-alpha",
        type=float,
        default=None,
        metavar="ALPHA",
        help=f"--distill: weight of the KD term, in [0, 1] (default {KD_ALPHA:g}, RepDistiller's)",
    )
    g.add_argument(
        "--recalibrate-bn",
        type=int,
        default=0,
        metavar="N",
        help="re-estimate every BatchNorm's statistics on N training batches after the warm start, before the "
        "first step (default 0: keep the original's)",
    )
    g.add_argument(
        "--evaluate-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate before the first step: metrics.jsonl's epoch 0, with the trained original's figures; "
        "default on with a trained original",
    )

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
    """Fill the defaults that depend on other flags and the output directory; check values that argparse cannot.

    Raises:
        ConfigError: a value out of its range (see :data:`RANGES`), ``--model-kwargs`` outside
            :data:`share_transform.build.MODEL_KWARGS`, or flags that cannot go together (a sharing option with
            ``--no-share``, ``--distill`` or a warm start without a trained original, a trained original that
            nothing uses, a flag of the other schedule).
    """
    protocol = vars(args).pop(_PROTOCOL, None)  # None: resolved already
    if protocol is not None:
        _resolve_schedule(args, protocol)
        _resolve_start(args, protocol["init"])
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resolve_schedule(args: argparse.Namespace, protocol: dict[str, Any]) -> None:
    """``--epochs``, ``--lr`` and the schedule's own flags: the recipe's, or :data:`FINETUNE`'s."""
    finetune = args.schedule == "finetune"
    if args.epochs is None:
        args.epochs = FINETUNE.epochs(protocol["epochs"]) if finetune else protocol["epochs"]
    if args.lr is None:
        args.lr = protocol["lr"] / FINETUNE.lr_divisor if finetune else protocol["lr"]
    other = ("lr_milestones", "lr_gamma") if finetune else ("warmup_epochs",)
    for name in other:
        if getattr(args, name) is not None:
            raise ConfigError(f"{_flag(name)} belongs to --schedule {'step' if finetune else 'finetune'}")
    if finetune:
        args.lr_milestones, args.lr_gamma = [], None
        if args.warmup_epochs is None:
            args.warmup_epochs = FINETUNE.warmup_epochs
    else:
        if args.lr_milestones is None:
            args.lr_milestones = list(protocol["milestones"])
        if args.lr_gamma is None:
            args.lr_gamma = protocol["gamma"]


def has_original(args: argparse.Namespace) -> bool:
    """True when the run names a trained original (``--pretrained`` or ``--from-checkpoint``)."""
    return bool(getattr(args, "pretrained", False) or getattr(args, "from_checkpoint", None) is not None)


def is_warm_start(args: argparse.Namespace) -> bool:
    """True when the shared model starts from the trained original's weights (a warm-start ``--init``)."""
    return getattr(args, "init", None) in WARM_STARTS


def _resolve_start(args: argparse.Namespace, scratch_init: str) -> None:
    """``--init`` and the trained-original flags, checked against each other (see the module docstring)."""
    original = has_original(args)
    if args.pretrained and args.from_checkpoint is not None:
        raise ConfigError("give one trained original: --pretrained or --from-checkpoint, not both")
    if args.pretrained_path is not None and not args.pretrained:
        raise ConfigError("--pretrained-path is read as timm's pretrained weights; it needs --pretrained")
    if args.distill and not original:
        raise ConfigError(
            "--distill needs a trained original to learn from: give --from-checkpoint FILE|RUN or --pretrained"
        )
    for name in ("kd_temperature", "kd_alpha"):
        if getattr(args, name) is not None and not args.distill:
            raise ConfigError(f"{_flag(name)} sets the distillation loss; it needs --distill")
    if args.distill:
        args.kd_temperature = KD_TEMPERATURE if args.kd_temperature is None else args.kd_temperature
        args.kd_alpha = KD_ALPHA if args.kd_alpha is None else args.kd_alpha
    if args.init is None:
        warm = original and args.share
        args.init = ("svd" if args.templates is not None else "mean") if warm else scratch_init
    if args.init in WARM_STARTS:
        if not original:
            raise ConfigError(
                f"--init {args.init} is a warm start from trained weights: give --from-checkpoint FILE|RUN or "
                f"--pretrained (or --init {scratch_init} to train from scratch)"
            )
        if not args.share:
            raise ConfigError(
                f"--init {args.init} shares the trained original's weights; with --no-share nothing is shared "
                "(the model would be the original itself)"
            )
        if (args.init == "svd") != (args.templates is not None):
            raise ConfigError(
                "--init svd warm-starts soft groups: give --templates K"
                if args.init == "svd"
                else f"--init {args.init} makes one hard-shared weight; with --templates use --init svd"
            )
    elif original and not args.distill:
        raise ConfigError(
            f"the trained original would go unused: --init {args.init} trains from scratch and there is no "
            "--distill; give a warm start (--init mean, mean-scaled, or svd with --templates) or --distill"
        )
    if args.allocate == "weights" and args.init not in WARM_STARTS:
        raise ConfigError(
            "--allocate weights chooses the runs from trained weights, and fresh ones say nothing about where to "
            "share: give a trained original (--from-checkpoint or --pretrained) and a warm start --init"
        )
    if args.recalibrate_bn and args.init not in WARM_STARTS:
        raise ConfigError(
            "--recalibrate-bn re-estimates the BatchNorm statistics of a warm start; this run trains from scratch"
        )
    if args.evaluate_first is None:
        args.evaluate_first = original


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
    "warmup_epochs": (0, math.inf, True),
    "kd_temperature": (0, math.inf, False),
    "kd_alpha": (0, 1, True),
    "recalibrate_bn": (0, math.inf, True),
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


#: The sharing options both recipes take, one flag each, as :class:`share_transform.SharingOptions` names them
#: (``--allocate weights`` needs a warm start: fresh weights say nothing about where to share).
SHARING_FLAGS = tuple(f.name for f in fields(SharingOptions))


def sharing_options(args: argparse.Namespace) -> SharingOptions | None:
    """The sharing options of a run as given (None for an unshared run; ``--allocate`` unset is ``"uniform"``)."""
    if not args.share:
        return None
    given: dict[str, Any] = {flag: getattr(args, flag, None) for flag in SHARING_FLAGS}
    return SharingOptions(**{**given, "allocate": given["allocate"] or "uniform"})
