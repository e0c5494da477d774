"""``fit``: the epoch loop both recipes run, with the run-directory contract; and ``run_recipe``.

Run directory (``--output``), written by rank 0 only:

* ``run.json`` at the start of a run: ``recipe``, ``arch``, ``dataset``, ``share`` (whether the model
  trained is shared: false for ``--share`` with a policy that finds nothing to share), ``policy``,
  ``sharing`` (``group_size``, ``scope``, ``templates``, ``budget`` as given; None for an unshared run),
  ``seed``, ``epochs``, ``batch_size``, ``lr`` (the optimizer's initial lr, after batch scaling),
  ``params_unshared``, ``unique_params``, ``schedule``, ``warm_start`` (the ``--init`` that shared a trained
  original, or None), ``teacher`` (the trained original: its source and the SHA-256 of its weights, or None),
  ``distill`` (``temperature``, ``alpha``, or None), recipe extras (the CIFAR recipe's ``val_split``), ``args``
  (every CLI argument, with the defaults a recipe resolved);
* ``metrics.jsonl``, one line per finished epoch (and an epoch-0 line, measured before the first step, in a run
  from a trained original or with ``--evaluate-first``), and ``curves.png`` (see :mod:`.metrics`; skipped, with a
  one-line note, where matplotlib is not installed);
* ``checkpoint-last.*`` after every epoch and ``checkpoint-best.*`` at the best held-out top-1 error
  (see :mod:`.checkpoint`); each state carries the ``run.json`` record.

Model selection: ``val_loader`` is the held-out set evaluated after every epoch, whose top-1 error chooses
``checkpoint-best``. Given a ``test_loader`` as well, ``val_loader`` is a split held out of the training set
and the test set is evaluated once, after the last epoch, on the final and the best checkpoints only (their
epochs' lines in ``metrics.jsonl`` gain ``test_loss``, ``test_top1_err``, ``test_top5_err``). Without one,
the held-out set is the test set itself, and the best checkpoint is chosen on it (an optimistic choice).

Compressing a trained model (:mod:`.distill`): the recipe builds the shared model from the trained original's
weights (:func:`build_recipe_model` with ``original=``) and hands ``fit`` the original, evaluated once before the
first step (epoch 0), and with ``distill`` the teacher whose outputs the loss follows. A fresh run first
re-estimates the BatchNorm statistics on ``TrainConfig.recalibrate_bn`` training batches when asked.

A fresh run refuses a directory that already holds a checkpoint (``--resume`` continues it), so
nothing written is ever overwritten by accident. ``--resume`` checks the command's flags against the run's
record in the checkpoint (``run.json`` for checkpoints older than that record; it refuses when neither
exists) and rewrites ``run.json``. Nothing is written into ``--output`` before its lock is held
(:func:`locked_output`; a recipe takes it before its own first write). On a non-finite loss, or a data loader
worker killed by a signal, ``fit`` stops before writing anything from the bad epoch and names the last good
checkpoint.

Example (what a recipe's ``main`` does):
    >>> info = init_distributed(args.device)
    >>> setup_runtime(deterministic=args.deterministic)
    >>> with locked_output(args.output, resume=args.resume, dist_info=info, args=args):
    ...     fit(model, train_loader, val_loader, config=TrainConfig(...), dist_info=info, output=args.output,
    ...         resume=args.resume, run_info=run_info, train_preprocess=norm, eval_preprocess=norm)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..build import build_model
from ..errors import CheckpointError, MissingFileError, OutputExistsError, ShareError, debug_requested
from ..files import read_info
from ..init import init_weights
from ..planning import SharePlan, plan as make_plan
from ..policies import POLICIES, SharingOptions
from ..tie import PLAIN_ATTR, alias_groups, apply, count_parameters, get_plan, keep_ties
from ..warmstart import recalibrate_bn
from .args import SHARING_FLAGS, is_warm_start, sharing_options
from .checkpoint import (
    best_epoch,
    check_training_state,
    has_checkpoint,
    load_run_checkpoint,
    read_run_record,
    repair_checkpoints,
    save_checkpoint,
    state_path,
    weights_path,
)
from .data.sampling import sample_seed, set_epoch
from .distill import Distillation, Original, describe
from .distributed import DistInfo, barrier, broadcast_buffers, cleanup, print0, print_error, share_verdict
from .errors import ConfigError, LoaderWorkerError, NonFiniteLossError
from .lock import check_unlocked, run_lock
from .loop import EpochStats, Preprocess, autocast, evaluate, to_device, train_one_epoch
from .metrics import (
    CURVES_FILE,
    METRICS_FILE,
    RUN_FILE,
    ProgressBar,
    append_metrics,
    matplotlib_missing,
    plot_curves,
    write_metrics,
    write_text,
)
from .optim import build_optimizer, build_scheduler, per_step, scaled_lr


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation protocol and the speed options of a run.

    ``lr`` is the optimizer's learning rate for the global batch (scale a per-256 figure with
    :func:`share_transform.train.optim.scaled_lr` first); ``schedule`` ``"step"``: ``milestones`` are 0-based
    epochs after which the lr is multiplied by ``gamma``; ``"finetune"``: ``warmup_epochs`` of linear warm-up
    then a cosine to 0, per step. ``recalibrate_bn``: training batches to re-estimate the BatchNorm statistics
    on before the first step (0: none); ``evaluate_first``: measure the model (and the trained original) before
    the first step, as epoch 0.
    """

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    milestones: Sequence[int]
    gamma: float | None
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 20
    schedule: str = "step"
    warmup_epochs: float = 0.0
    recalibrate_bn: int = 0
    evaluate_first: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config of the recipes' common flags; ``--lr`` is per ``--lr-reference-batch`` images."""
        return cls(
            epochs=args.epochs,
            lr=scaled_lr(args.lr, args.batch_size, args.lr_reference_batch),
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            milestones=args.lr_milestones,
            gamma=args.lr_gamma,
            amp=args.amp,
            channels_last=args.channels_last,
            compile=args.compile,
            seed=args.seed,
            log_every=args.print_freq,
            schedule=getattr(args, "schedule", "step"),
            warmup_epochs=float(getattr(args, "warmup_epochs", None) or 0.0),
            recalibrate_bn=int(getattr(args, "recalibrate_bn", 0) or 0),
            evaluate_first=bool(getattr(args, "evaluate_first", False)),
        )


def build_recipe_model(
    args: argparse.Namespace,
    num_classes: int,
    *,
    input_size: tuple[int, int, int] | None = None,
    original: nn.Module | None = None,
) -> tuple[nn.Module, int, int]:
    """Build ``--arch`` with the recipe's init, share it when ``--share``; also the unshared and unique counts.

    With ``original`` (the trained original, :func:`share_transform.train.distill.load_original`) and a warm-start
    ``--init`` (``mean``, ``mean-scaled``, ``svd``), the model is a copy of the original shared with that warm
    start (``--allocate weights`` chooses its groups from the trained weights); ``original`` is left as it was.

    A ``--share`` whose policy finds nothing to share in ``--arch`` (WRN-16-k under ``cifar``: one block a
    stage, and the policy keeps each stage's first block) leaves the model unshared, with no plan recorded,
    and says so in one line on stderr; :func:`is_shared` then tells the recipe not to call the run shared.

    Raises:
        ConfigError: ``--no-share`` with a network shared by construction (``sharesnet18``).
        PlanMismatchError: ``--share`` with options other than those a network shared by construction has.
    """
    if original is not None and is_warm_start(args):
        return _warm_start(args, original, input_size)
    model = build_model(args.arch, num_classes=num_classes, **args.model_kwargs)
    built = get_plan(model)  # a network shared by construction: its plan counts it before sharing
    if built is not None and not args.share:
        raise ConfigError(
            f"--arch {args.arch} is shared by construction (policy {built.policy}); for an unshared run use "
            f"--arch {getattr(model, PLAIN_ATTR, 'the network it shares')}"
        )
    init_weights(model, args.init)
    init_classifier(model, getattr(args, "classifier_init", None) or "uniform")
    params_unshared = built.params_before if built is not None else count_parameters(model)
    options = sharing_options(args)
    if options is not None and built is not None:
        apply(model, args.policy, input_size=input_size, options=options)  # its own plan, or the re-apply refusal
    elif options is not None:
        share_plan = make_plan(model, args.policy, input_size=input_size, options=options)
        if share_plan.groups:
            apply(model, plan=share_plan)
        else:
            print0(f"note: {_nothing_shared(args, share_plan, params_unshared)}", file=sys.stderr)
    return model, params_unshared, count_parameters(model)


def _warm_start(
    args: argparse.Namespace, original: nn.Module, input_size: tuple[int, int, int] | None
) -> tuple[nn.Module, int, int]:
    """A copy of the trained original, shared with the warm start ``args.init``."""
    if get_plan(original) is not None:
        raise ConfigError(
            f"--arch {args.arch} is shared by construction; a warm start shares an unshared original: give --arch "
            f"{getattr(original, PLAIN_ATTR, 'the network it shares')}"
        )
    model = copy.deepcopy(original)
    model.train()
    model.requires_grad_(True)
    params_unshared = count_parameters(model)
    share_plan = make_plan(model, args.policy, input_size=input_size, options=sharing_options(args))
    if share_plan.groups:
        apply(model, plan=share_plan, init=args.init)
    else:
        print0(f"note: {_nothing_shared(args, share_plan, params_unshared)}", file=sys.stderr)
    return model, params_unshared, count_parameters(model)


def _nothing_shared(args: argparse.Namespace, share_plan: SharePlan, params: int) -> str:
    reasons = sorted({c.kept_because for c in share_plan.spatial_convs if c.kept_because})
    why = f" (every spatial conv keeps its own weight: {'; '.join(reasons)})" if reasons else ""
    return (
        f"--share: policy {args.policy} shares nothing in {args.arch}{why}; training the original network, "
        f"{params:,} parameters, recorded as unshared"
    )


def is_shared(model: nn.Module) -> bool:
    """True when ``model`` carries a share plan with at least one group (what ``run.json``'s ``share`` records)."""
    plan = get_plan(model)
    return plan is not None and bool(plan.groups)


@torch.no_grad()
def init_classifier(model: nn.Module, mode: str) -> nn.Module:
    """``"he"``: every linear layer's weight He-normal, ``N(0, sqrt(2 / in_features))``, as the soft-sharing
    reference initialises its classifier (``kaiming_normal_``); ``"uniform"``: left as built (torch's default).
    Biases are zeroed by :func:`share_transform.init.init_weights`.

    Raises:
        ConfigError: an unknown ``mode``.
    """
    if mode not in ("uniform", "he"):
        raise ConfigError(f"unknown classifier init {mode!r}; choose uniform or he")
    if mode == "he":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features))
    return model


def run_info(
    args: argparse.Namespace,
    *,
    recipe: str,
    dataset: str,
    config: TrainConfig,
    params_unshared: int,
    unique_params: int,
    shared: bool | None = None,
    original: Original | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``run.json`` record both recipes write (the report reads it).

    ``shared``: whether the model trained is shared (:func:`is_shared`); default ``args.share``. A ``--share``
    that shared nothing is recorded as an unshared run: no policy, no sharing options. ``original``: the trained
    original (its record is ``teacher``; a resume refuses another).
    """
    share = args.share if shared is None else shared
    options = sharing_options(args) if share else None
    distill = bool(getattr(args, "distill", False))
    return {
        "recipe": recipe,
        "arch": args.arch,
        "dataset": dataset,
        "share": share,
        "policy": args.policy if share else None,
        "sharing": options.to_dict() if options is not None else None,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": config.lr,
        "params_unshared": params_unshared,
        "unique_params": unique_params,
        "schedule": getattr(args, "schedule", "step"),
        "warm_start": args.init if original is not None and is_warm_start(args) else None,
        "teacher": original.record if original is not None else None,
        "distill": {"temperature": args.kd_temperature, "alpha": args.kd_alpha} if distill else None,
        **extra,
        "args": vars(args),
    }


def setup_runtime(*, deterministic: bool) -> None:
    """Kernel selection: cuDNN autotuning and TF32 for speed, or deterministic kernels throughout."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        # warn_only: a few CUDA backward kernels (adaptive average pooling) have no deterministic version;
        # they warn instead of stopping the run. Every CPU kernel used here is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device) and Python's ``random``."""
    random.seed(seed)
    torch.manual_seed(seed)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """``global_batch / world_size``; raises :class:`ConfigError` unless it divides exactly.

    Check it before :func:`init_distributed` (``world_from_env()`` gives the world size), so a bad
    value fails at once instead of after the rendezvous.
    """
    if global_batch % world_size:
        raise ConfigError(
            f"--batch-size {global_batch} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    return global_batch // world_size


#: The optimisation flags a resume must repeat: the checkpoint's optimizer and schedule carry the run's values,
#: so a new value would be recorded in run.json but not used; the distillation loss's too. ``--epochs`` may change
#: (grow) on resume, except under ``--schedule finetune``, whose cosine spans the run's epochs.
PROTOCOL_FLAGS = (
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "lr_milestones",
    "lr_gamma",
    "warmup_epochs",
    "distill",
    "kd_temperature",
    "kd_alpha",
)
#: The flags that made the run's model and data stream (``img_size`` is the ImageNet recipe's; ``dataset``,
#: ``preprocess``, ``val_split``, ``cutout``, ``pad``, ``hflip`` the CIFAR recipe's).
RUN_FLAGS = (
    "arch",
    "batch_size",
    "seed",
    "img_size",
    "init",
    "classifier_init",
    "policy",
    "model_kwargs",
    "dataset",
    "synthetic",
    "preprocess",
    "val_split",
    "cutout",
    "pad",
    "hflip",
    "recalibrate_bn",
)
#: Flags that only mean something under another flag: their effective value is None otherwise.
_ONLY_UNDER = {
    "kd_temperature": ("distill", True),
    "kd_alpha": ("distill", True),
    "warmup_epochs": ("schedule", "finetune"),
    "lr_milestones": ("schedule", "step"),
    "lr_gamma": ("schedule", "step"),
}
#: Why a resume refuses a changed flag: the checkpoint's optimizer and schedule carry the optimisation flags,
#: its tensors are the model the sharing flags built, and the run flags made that model and its data.
_RESUME_REASONS = {
    **dict.fromkeys(PROTOCOL_FLAGS, "the run's optimizer and schedule keep its values"),
    **dict.fromkeys(SHARING_FLAGS, "its checkpoint holds the model these sharing options built"),
    **dict.fromkeys(RUN_FLAGS, "its checkpoint and data stream were made with the run's value"),
}


def check_output(output: Path, *, resume: bool, args: argparse.Namespace | dict[str, Any] | None = None) -> None:
    """Check, without writing anything, that ``output`` can take this run.

    Call it early (before building data and model) to fail fast; :func:`fit` checks again.

    Args:
        output: the run directory.
        resume: continue the run in ``output``.
        args: the command's arguments (see :func:`share_transform.train.add_training_args`); on resume, their
            :data:`PROTOCOL_FLAGS` and sharing options (``SHARING_FLAGS``) must equal the run's (its
            ``run.json`` ``args``).

    Raises:
        OutputExistsError: ``output`` is a file, or a fresh run would overwrite a run (a checkpoint or
            metrics).
        OutputLockedError: another process is running in ``output`` (the message names its PID).
        MissingFileError: ``resume`` without a checkpoint.
        CheckpointError: ``resume`` with another effective value of an optimisation or sharing flag, or of
            :data:`RUN_FLAGS`, than the run's (as the checkpoint records it; ``run.json`` for older checkpoints);
            a ``run.json`` that is not a JSON object; no record of the run's flags at all.
    """
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"--output {output} is a file, not a directory")
    if output.is_dir():
        check_unlocked(output)
    found = has_checkpoint(output, "last")
    metrics = output / METRICS_FILE
    if not resume and (found or (metrics.is_file() and metrics.stat().st_size > 0)):
        held = weights_path(output, "last").name if found else metrics.name
        raise OutputExistsError(
            f"{output} already holds a run ({held}); pass --resume to continue it, or choose another --output"
        )
    if resume and not found:
        raise MissingFileError(f"--resume: {output} holds no checkpoint-last to continue from")
    if resume and args is not None:
        _check_same_protocol(output, vars(args) if isinstance(args, argparse.Namespace) else args)


def _read_run_json(output: Path) -> dict[str, Any]:
    """The run's ``run.json`` (empty when there is none, or it is empty); a tampered one is a
    :class:`CheckpointError`."""
    path = output / RUN_FILE
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        run = json.loads(text) if text.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--resume: {path} is not valid JSON ({e}); it was not written by a run") from None
    if not isinstance(run, dict) or not isinstance(run.get("args", {}), dict):
        raise CheckpointError(f"--resume: {path} is not a run record (a JSON object with an args object)")
    return run


def run_record(output: Path) -> dict[str, Any]:
    """What the run in ``output`` was trained with: the record its ``checkpoint-last`` state carries, else (a
    checkpoint older than that record) its ``run.json``.

    Raises:
        CheckpointError: ``run.json`` is malformed, or neither the checkpoint nor ``run.json`` records the run's
            flags, so a resume could not be checked.
    """
    from_json = _read_run_json(output)  # read even when the checkpoint has the record: tampering is refused
    record = read_run_record(output, "last")
    if record is not None:
        return record
    if not from_json.get("args"):
        raise CheckpointError(
            f"--resume: {output} records no flags to check this command against ({RUN_FILE} is missing or empty, "
            f"and {state_path(output, 'last').name} predates recording them); restore {RUN_FILE}, or start a new "
            "run in another --output"
        )
    return from_json


def _check_same_protocol(output: Path, args: dict[str, Any]) -> None:
    before = run_record(output)["args"]
    for key, reason in _RESUME_REASONS.items():
        if key not in before or key not in args:
            continue
        was, now = effective_flag(before, key), effective_flag(args, key)
        if was != now:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"--resume: {output} was trained with {flag} {_flag_text(was)}, this command gives "
                f"{flag} {_flag_text(now)}; {reason}, so resume "
                f"with the same {flag} or start a new run in another --output"
            )
    if effective_flag(args, "schedule") == "finetune" and before.get("epochs") != args.get("epochs"):
        raise CheckpointError(
            f"--resume: {output} was trained with --epochs {before.get('epochs')} under --schedule finetune, this "
            f"command gives --epochs {args.get('epochs')}; the cosine schedule spans the run's epochs, so resume "
            "with the same --epochs or start a new run in another --output"
        )


def effective_flag(args: dict[str, Any], key: str) -> Any:
    """The value flag ``key`` of a command (``vars(args)``, or a ``run.json`` ``args``) has in effect.

    Sharing options are resolved by the policy (``--scope`` None under ``swrn`` is ``all``) and are None, like
    ``--policy``, for an unshared run; the KD flags are None without ``--distill``, the step schedule's under
    ``--schedule finetune`` and ``--warmup-epochs`` under ``step``; any other flag is its value (a tuple as a
    list, as JSON stores it).
    """
    value = args.get(key)
    shared = bool(args.get("share", True))
    if key in _ONLY_UNDER:
        flag, needed = _ONLY_UNDER[key]
        default = {"distill": False, "schedule": "step"}[flag]  # records older than the flag
        if args.get(flag, default) != needed:
            return None
    if key == "policy":
        return value if shared else None
    if key in SHARING_FLAGS:
        if not shared:
            return None
        options = SharingOptions.from_dict({f: args.get(f) for f in SHARING_FLAGS})
        rule = POLICIES.get(str(args.get("policy")))
        if rule is not None:
            with contextlib.suppress(ShareError):  # a value the plan refuses: compared as given
                options = options.check(str(args.get("arch")), rule)
        return getattr(options, key)
    return list(value) if isinstance(value, tuple) else value


def _flag_text(value: Any) -> str:
    """A flag's value as typed on the command line (``--lr-milestones 30 60``)."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def json_record(run_info: dict[str, Any]) -> dict[str, Any]:
    """``run_info`` as ``run.json`` holds it: paths and other non-JSON values as strings, tuples as lists."""
    return cast(dict[str, Any], json.loads(json.dumps(run_info, default=str)))


def write_run_json(output: Path, run_info: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (paths and other non-JSON values become strings)."""
    write_text(output / RUN_FILE, json.dumps(json_record(run_info), indent=2) + "\n")


def _check_same_run(output: Path, run_info: dict[str, Any]) -> None:
    before = run_record(output)
    for key in ("arch", "share", "policy", "dataset", "batch_size"):
        if key in before and before[key] != run_info.get(key):
            raise CheckpointError(
                f"--resume: {output} was started with {key}={before[key]!r}, this command gives "
                f"{run_info.get(key)!r}; resume with the same settings or choose another --output"
            )
    was, now = before.get("teacher"), run_info.get("teacher")
    if _teacher_key(was) != _teacher_key(now):
        raise CheckpointError(
            f"--resume: {output} was trained from {_teacher_text(was)}, this command gives {_teacher_text(now)}; "
            "the run's shared model and its distillation targets come from its trained original, so resume with the "
            "same one or start a new run in another --output"
        )


def _teacher_key(record: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What a resume compares of a trained original: where it comes from and what its weights are."""
    return None if not record else (record.get("source"), record.get("weights_sha256"))


def _teacher_text(record: dict[str, Any] | None) -> str:
    if not record:
        return "no trained original"
    return f"{describe(record)} (weights sha256 {str(record.get('weights_sha256'))[:12]})"


@dataclass
class _Run:
    """What ``fit``'s steps share: the model (plain and as trained), its optimizer and where the run stands."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    dist_info: DistInfo
    output: Path
    steps: int
    shared: bool
    record: dict[str, Any]  # run.json's content, stored with every checkpoint
    held_out: str  # what val_loader holds: "val" (a split of the training set) or "test"
    draw_curves: bool
    input_size: tuple[int, int, int] | None = None  # recorded in the checkpoints' weights files
    distill: Distillation | None = None  # the teacher as the training step calls it (compiled with --compile)
    original: nn.Module | None = None  # the trained original, evaluated before the first step
    history: list[dict[str, Any]] = field(default_factory=list)
    best_err: float = float("inf")
    start_epoch: int = 0


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    config: TrainConfig,
    dist_info: DistInfo,
    output: Path,
    resume: bool,
    run_info: dict[str, Any],
    train_preprocess: Preprocess | None = None,
    eval_preprocess: Preprocess | None = None,
    title: str = "",
    test_loader: DataLoader | None = None,
    input_size: tuple[int, int, int] | None = None,
    distill: Distillation | None = None,
    original: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``config.epochs`` epochs (from the last checkpoint with ``resume``).

    Args:
        model: built, initialised and shared on the CPU; ``fit`` moves it to the device (keeping its
            ties), wraps it in DDP when the world size is above 1 and compiles it on request.
        train_loader, val_loader: from :func:`share_transform.train.data.sampling.make_loader`; ``val_loader``
            is evaluated after every epoch and its top-1 error chooses ``checkpoint-best``.
        test_loader: the test set, when ``val_loader`` is a split held out of the training set: evaluated once
            after the last epoch, on the final and the best checkpoints (see the module docstring).
        config: the optimisation protocol.
        dist_info: from :func:`init_distributed`.
        output: the run directory.
        resume: continue from ``output``'s ``checkpoint-last``.
        run_info: the ``run.json`` record (checked against the old one on resume, then rewritten).
        train_preprocess, eval_preprocess: device-side input transforms.
        title: heading of ``curves.png``.
        input_size: ``(C, H, W)`` the model trains at, recorded in every checkpoint's weights file (``sharetx
            inspect`` shows it, ``sharetx export`` uses it); default: the share plan's.
        distill: learn from a teacher's outputs (:class:`share_transform.train.distill.Distillation`); the
            teacher is moved to the device (and compiled with ``config.compile``) but never wrapped, optimised
            or checkpointed.
        original: the trained original the model was made from, evaluated before the first step with
            ``config.evaluate_first`` (default: ``distill``'s teacher).

    Returns:
        The metrics history, one record per epoch (also in ``metrics.jsonl``), after an epoch-0 record when the
        model was evaluated before the first step.

    Raises:
        OutputExistsError, MissingFileError: see :func:`check_output`.
        CheckpointError: an unreadable checkpoint, or ``resume`` with other settings than the run's (arch,
            share, policy, dataset, batch size, or a :data:`PROTOCOL_FLAGS` value; ``epochs`` may grow).
        NonFiniteLossError: the loss became NaN/inf; nothing from that epoch was written.
        LoaderWorkerError: a data loader worker died (killed by a signal); the last checkpoint is kept.
    """
    output = Path(output)
    with locked_output(output, resume=resume, dist_info=dist_info, args=run_info.get("args")):
        run = _start_run(
            model,
            config,
            dist_info,
            output,
            run_info=run_info,
            steps=len(train_loader),
            split=test_loader is not None,
            distill=distill,
            original=original if original is not None else (distill.teacher if distill is not None else None),
        )
        run.input_size = input_size
        if resume:
            _resume(run, run_info)
        if dist_info.is_main:
            if not (run.output / RUN_FILE).is_file() and resume:
                print0(
                    f"note: {run.output / RUN_FILE} was missing; this command was checked against the run's record in "
                    "its checkpoint, and run.json is written again"
                )
            write_run_json(run.output, run.record)  # on resume too: --epochs may have grown
        try:
            if not resume:
                _before_first_step(run, train_loader, val_loader, test_loader, train_preprocess, eval_preprocess)
            run.original = None  # measured (or restored from the checkpoint); the teacher stays in run.distill
            for epoch in range(run.start_epoch, config.epochs):
                lr = run.optimizer.param_groups[0]["lr"]
                bar = ProgressBar(run.steps, f"epoch {epoch + 1}/{config.epochs}") if dist_info.is_main else None
                train = _train_epoch(run, epoch, train_loader, val_loader, train_preprocess, bar)
                val = _evaluate_epoch(run, val_loader, eval_preprocess)
                record = _epoch_record(run, epoch, lr, train, val)
                is_best = val.top1_err < run.best_err
                run.best_err = min(run.best_err, val.top1_err)
                run.history.append(record)
                if bar is not None:
                    bar.close(_epoch_summary(record))
                if dist_info.is_main:
                    _save_epoch(run, record, is_best=is_best, title=title)
            barrier()
            if test_loader is not None and run.history:
                _test_final_and_best(run, test_loader, eval_preprocess, title)
        except (RuntimeError, OSError, EOFError) as e:
            death = _loader_failure(e, [train_loader, val_loader, test_loader])
            if death is None:
                raise
            raise LoaderWorkerError(f"{death}; {_last_checkpoint(run.output)}") from None
        barrier()
    return run.history


#: torch's words for a loader worker that died: the SIGCHLD handler's, and the fetch timeout's.
_WORKER_DEATH = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)"
)


def _loader_failure(error: BaseException, loaders: Sequence[object]) -> str | None:
    """:func:`_worker_death` of ``error``; when a worker died, the loaders' workers are stopped too. torch's SIGCHLD
    handler is set aside meanwhile, so it cannot raise in the middle; back, it finds no dead worker registered."""
    with _sigchld_held():
        death = _worker_death(error, loaders)
        if death is not None:
            _stop_workers(loaders)
    return death


@contextmanager
def _sigchld_held() -> Iterator[None]:
    """SIGCHLD handled by a no-op for the block (a signal received before it starts runs the no-op too)."""
    try:
        before = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    except (AttributeError, ValueError):  # not the main thread, or no SIGCHLD: nothing to set aside
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, before)


def _worker_death(error: BaseException, loaders: Sequence[object]) -> str | None:
    """One line for a DataLoader worker's death, or None when ``error`` has another cause.

    torch says so with a RuntimeError from its SIGCHLD handler (raised anywhere in the main thread), but the
    dead worker's socket or queue often fails first (ConnectionResetError, EOFError); then the kernel is asked,
    for up to a second while the worker's exit reaches it, whether a worker of ``loaders`` died.
    """
    # torch's own check of its workers' exit status, the one its SIGCHLD handler calls (private).
    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

    match = _WORKER_DEATH.search(str(error))
    with_workers = any(getattr(loader, "num_workers", 0) for loader in loaders)
    # Until the kernel names the signal ("exited unexpectedly" is torch's word when a fetch found the worker gone).
    for _ in range(20 if with_workers and (match is None or match.group(2) is None) else 0):
        try:
            _error_if_any_worker_fails()
        except RuntimeError as e:
            match = _WORKER_DEATH.search(str(e)) or match
            if match is not None and match.group(2) is not None:
                break
        time.sleep(0.05)
    if match is None:
        return None
    pids, how = match.group(1).strip(), match.group(2)
    if how is not None:
        names = {signal.strsignal(s): s.name for s in signal.Signals}  # "Killed" -> SIGKILL
        how = f"was killed by {names.get(how.strip(), 'signal ' + how.strip())}"
    else:  # the fetch reaped the worker: its exit code, a negative signal number, is the Process object's
        workers = [w for loader in loaders for w in getattr(getattr(loader, "_iterator", None), "_workers", ())]
        codes = [w.exitcode for w in workers if str(w.pid) in pids.split(", ") and w.exitcode is not None]
        how = f"was killed by {signal.Signals(-codes[0]).name}" if codes and codes[0] < 0 else "exited unexpectedly"
    return (
        f"a data loader worker (pid {pids}) {how}; out of memory is the usual cause (the kernel's OOM killer "
        "sends SIGKILL): lower --workers or --batch-size"
    )


def _stop_workers(loaders: Sequence[object]) -> None:
    """Shut the loaders' workers down now, while the process can still say why it stops: left to the interpreter's
    exit, a persistent iterator with a dead worker prints a traceback, and torch's SIGCHLD handler raises again
    until the dead worker's pid is unregistered (which the shutdown does)."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # DataLoader's persistent-workers iterator (private)
        stop = getattr(iterator, "_shutdown_workers", None)
        for _ in range(3):  # the SIGCHLD handler may interrupt the shutdown itself
            try:
                if stop is not None:
                    stop()
                break
            except (RuntimeError, OSError, EOFError):
                continue


def _last_checkpoint(output: Path) -> str:
    path = weights_path(output, "last")
    if not path.is_file():
        return "no checkpoint had been written yet"
    epoch = read_info(path).user.get("epoch", "?")
    return f"the last checkpoint, {path} (epoch {epoch}), is kept: continue with --resume"


def _test_final_and_best(run: _Run, test_loader: DataLoader, preprocess: Preprocess | None, title: str) -> None:
    """Evaluate the test set on the final model and the best checkpoint (chosen on the held-out split) only;
    their epochs' records gain the test figures, and rank 0 rewrites ``metrics.jsonl`` and the curves."""
    final, best = run.history[-1]["epoch"], best_epoch(run.history)
    device, amp = run.dist_info.device, run.config.amp
    results = {final: evaluate(run.model, test_loader, device=device, preprocess=preprocess, amp=amp)}
    if best is not None and best != final:
        best_model = copy.deepcopy(run.model)  # the returned model stays the final one
        load_run_checkpoint(run.output, "best", best_model, device=device)
        results[best] = evaluate(best_model, test_loader, device=device, preprocess=preprocess, amp=amp)
        del best_model
    for record in run.history:
        stats = results.get(record["epoch"])
        if stats is not None:
            record.update(test_loss=stats.loss, test_top1_err=stats.top1_err, test_top5_err=stats.top5_err)
    print0(
        "test set, evaluated once: "
        + "; ".join(
            f"{'final' if e == final else 'best'}{' and best' if e == final == best else ''} (epoch {e}) "
            f"top-1 err {s.top1_err:.2f}%  top-5 err {s.top5_err:.2f}%"
            for e, s in sorted(results.items(), key=lambda item: item[0] != final)
        )
        + f"; checkpoint-best was chosen on the held-out split (epoch {best})"
    )
    if run.dist_info.is_main:
        write_metrics(run.output / METRICS_FILE, run.history)
        if run.draw_curves:
            plot_curves(run.output / CURVES_FILE, run.history, title=title, held_out=run.held_out)


@contextmanager
def locked_output(
    output: Path, *, resume: bool, dist_info: DistInfo, args: argparse.Namespace | dict[str, Any] | None
) -> Iterator[None]:
    """Rank 0 checks the run directory, creates it and holds its lock for the ``with`` block; the other ranks
    wait for its verdict.

    Only rank 0 looks: another rank checking the directory would find rank 0's own lock, a race every
    multi-process start could lose. Rank 0 shares its verdict (None, or its error's message) with one
    collective, so every rank fails when rank 0 refuses the directory, and none waits for ever.

    Raises:
        the errors of :func:`check_output` on rank 0; :class:`ConfigError` quoting rank 0's on the others.
    """
    if not dist_info.is_main:
        verdict = share_verdict(None)
        if verdict is not None:
            raise ConfigError(f"rank 0 refused --output {output}: {verdict}")
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            check_output(output, resume=resume, args=args)
            output.mkdir(parents=True, exist_ok=True)
            stack.enter_context(run_lock(output))
            check_output(output, resume=resume, args=args)  # a run that ended since the first check left files
        except (ShareError, OSError) as e:
            share_verdict(str(e))
            raise
        share_verdict(None)
        yield


def _start_run(
    model: nn.Module,
    config: TrainConfig,
    dist_info: DistInfo,
    output: Path,
    *,
    run_info: dict[str, Any],
    steps: int,
    split: bool = False,
    distill: Distillation | None = None,
    original: nn.Module | None = None,
) -> _Run:
    """Move the model (and the trained original) to the device, ties kept; build the optimizer; wrap."""
    device = dist_info.device
    ties = alias_groups(model)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    keep_ties(model, ties, f"moving the model to {device}")
    for teacher in {id(m): m for m in (original, distill.teacher if distill else None) if m is not None}.values():
        teacher.to(device)  # not wrapped, not optimised: each rank holds its own copy
        if config.channels_last:
            teacher.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = build_scheduler(
        optimizer,
        schedule=config.schedule,
        milestones=config.milestones,
        gamma=config.gamma,
        total_steps=config.epochs * steps,
        warmup_steps=round(config.warmup_epochs * steps),
    )
    train_model: nn.Module = model
    if dist_info.distributed:
        # DDP registers each shared weight once (it de-duplicates parameters) and broadcasts rank 0's copy.
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
        keep_ties(model, ties, "DistributedDataParallel")
    if config.compile:
        train_model = cast(nn.Module, torch.compile(train_model))
        if distill is not None:
            distill = Distillation(cast(nn.Module, torch.compile(distill.teacher)), distill.temperature, distill.alpha)
    shared = bool(run_info.get("share", False))
    draw = not matplotlib_missing()
    if not draw:
        print0(
            "note: matplotlib is not installed, so curves.png is not drawn (pip install 'share-transform[train]' "
            "draws it); metrics.jsonl has every figure",
            file=sys.stderr,
        )
    return _Run(
        model,
        train_model,
        optimizer,
        scheduler,
        config,
        dist_info,
        output,
        steps,
        shared,
        record=json_record(run_info),
        held_out="val" if split else "test",
        draw_curves=draw,
        distill=distill,
        original=original,
    )


def _resume(run: _Run, run_info: dict[str, Any]) -> None:
    """Load ``checkpoint-last`` into the model, optimizer and schedule; continue after its epoch."""
    _check_same_run(run.output, run_info)
    state = load_run_checkpoint(run.output, "last", run.model, device=run.dist_info.device)
    check_training_state(state, state_path(run.output, "last"))
    if run.config.epochs < state["epoch"]:
        raise CheckpointError(
            f"--resume: {run.output} has {state['epoch']} epochs done, more than --epochs {run.config.epochs}; "
            f"give --epochs {state['epoch']} or more"
        )
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"cannot resume: the optimizer state in {state_path(run.output, 'last')} does not fit the model ({e})"
        ) from None
    run.history, run.best_err = list(state["history"]), float(state["best_top1_err"])
    run.start_epoch = int(state["epoch"])
    if run.dist_info.is_main:
        repair_checkpoints(run.output, run.model, state, input_size=run.input_size)
        # Rewritten from the checkpoint: drops the line of an epoch that was not checkpointed.
        write_metrics(run.output / METRICS_FILE, run.history)
    print0(f"resumed from {weights_path(run.output, 'last')} after epoch {run.start_epoch}")


def _train_epoch(
    run: _Run,
    epoch: int,
    train_loader: DataLoader,
    val_loader: DataLoader,
    preprocess: Preprocess | None,
    bar: ProgressBar | None,
) -> EpochStats:
    """Seed the epoch, then train one pass; a non-finite loss says which checkpoint is the last good one."""
    # The epoch's randomness is a function of (seed, epoch, rank): resuming here replays it exactly.
    seed_all(sample_seed(run.config.seed, epoch, -1 - run.dist_info.rank))
    set_epoch(train_loader, epoch)
    set_epoch(val_loader, epoch)
    try:
        return train_one_epoch(
            run.train_model,
            train_loader,
            run.optimizer,
            epoch=epoch,
            device=run.dist_info.device,
            preprocess=preprocess,
            amp=run.config.amp,
            log_every=run.config.log_every,
            start_step=epoch * run.steps,
            progress=bar,
            distill=run.distill,
            scheduler=run.scheduler if per_step(run.scheduler) else None,
        )
    except NonFiniteLossError as e:
        last = (
            f"the last good checkpoint is {weights_path(run.output, 'last')} (epoch {epoch})"
            if epoch > 0 and has_checkpoint(run.output, "last")
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(f"{e}; {last}", epoch=e.epoch, step=e.step) from None


def _before_first_step(
    run: _Run,
    train_loader: DataLoader,
    val_loader: DataLoader,
    test_loader: DataLoader | None,
    train_preprocess: Preprocess | None,
    eval_preprocess: Preprocess | None,
) -> None:
    """A fresh run: re-estimate the BatchNorm statistics when asked, then measure the model and the trained
    original as epoch 0 (printed now; written to ``metrics.jsonl`` with epoch 1, once a checkpoint can resume it)."""
    if run.config.recalibrate_bn:
        _recalibrate(run, train_loader, train_preprocess, run.config.recalibrate_bn)
    if not run.config.evaluate_first:
        return
    broadcast_buffers(run.model)
    device, amp = run.dist_info.device, run.config.amp
    record: dict[str, Any] = {"epoch": 0}
    measured = [("", run.model)] + ([("teacher_", run.original)] if run.original is not None else [])
    for prefix, model in measured:
        for split, loader in (("val", val_loader), ("test", test_loader)):
            if loader is None:
                continue
            stats = evaluate(model, loader, device=device, preprocess=eval_preprocess, amp=amp)
            record.update(
                {
                    f"{prefix}{split}_loss": stats.loss,
                    f"{prefix}{split}_top1_err": stats.top1_err,
                    f"{prefix}{split}_top5_err": stats.top5_err,
                }
            )
            if not prefix and split == "val":
                record["val_images"] = stats.images
    record.update(unique_params=count_parameters(run.model), shared=run.shared)
    run.history.append(record)
    teacher = (
        f"  | trained original: top-1 err {record['teacher_val_top1_err']:.2f}%  top-5 err "
        f"{record['teacher_val_top5_err']:.2f}%"
        if "teacher_val_top1_err" in record
        else ""
    )
    print0(
        f"epoch 0 (before the first step): {run.held_out} loss {record['val_loss']:.4f}  top-1 err "
        f"{record['val_top1_err']:.2f}%  top-5 err {record['val_top5_err']:.2f}%{teacher}"
    )


def _recalibrate(run: _Run, train_loader: DataLoader, preprocess: Preprocess | None, n: int) -> None:
    """:func:`share_transform.recalibrate_bn` on the first ``n`` training batches of epoch 0's order (each rank its
    shard), under the run's autocast; then every rank takes rank 0's statistics."""
    seed_all(sample_seed(run.config.seed, 0, -1 - run.dist_info.rank))
    set_epoch(train_loader, 0)
    device = run.dist_info.device

    def inputs() -> Iterator[torch.Tensor]:
        for batch in train_loader:
            yield to_device(batch, device, preprocess)[0]

    with autocast(device, run.config.amp):
        used = recalibrate_bn(run.model, inputs(), n)
    broadcast_buffers(run.model)
    print0(f"recalibrated the BatchNorm statistics on {used} training batches")


def _evaluate_epoch(run: _Run, val_loader: DataLoader, preprocess: Preprocess | None) -> EpochStats:
    """Make every rank's BatchNorm statistics rank 0's, test, and step the schedule."""
    broadcast_buffers(run.model)
    val = evaluate(run.model, val_loader, device=run.dist_info.device, preprocess=preprocess, amp=run.config.amp)
    if not per_step(run.scheduler):
        run.scheduler.step()
    return val


def _epoch_record(run: _Run, epoch: int, lr: float, train: EpochStats, val: EpochStats) -> dict[str, Any]:
    """The epoch's ``metrics.jsonl`` line (see :mod:`.metrics`)."""
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train.loss,
        "train_top1_err": train.top1_err,
        "train_top5_err": train.top5_err,
        "val_loss": val.loss,
        "val_top1_err": val.top1_err,
        "val_top5_err": val.top5_err,
        "train_images": train.images,
        "val_images": val.images,
        "images_per_s": train.images_per_s,
        "unique_params": count_parameters(run.model),
        "shared": run.shared,
    }


def _epoch_summary(r: dict[str, Any]) -> str:
    return (
        f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}  top-1 err {r['train_top1_err']:.2f}%  | "
        f"val loss {r['val_loss']:.4f}  top-1 err {r['val_top1_err']:.2f}%  top-5 err {r['val_top5_err']:.2f}%  | "
        f"{r['images_per_s']:.1f} img/s  lr {r['lr']:.4g}"
    )


def _save_epoch(run: _Run, record: dict[str, Any], *, is_best: bool, title: str) -> None:
    """Rank 0: the checkpoints, then the metrics line and the curves."""
    epoch = record["epoch"]
    state = {
        "epoch": epoch,
        "global_step": epoch * run.steps,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "best_top1_err": run.best_err,
        "history": run.history,
        "run": run.record,
    }
    # Checkpoint before the metrics line: a kill in between is repaired from the history on resume. Last before
    # best: a kill between them leaves the best epoch in last, which the resume copies to best.
    for tag in ("last", "best") if is_best else ("last",):
        save_checkpoint(run.output, tag, run.model, state, input_size=run.input_size)
        print0(f"saved {weights_path(run.output, tag).name} (epoch {epoch})")
    if run.history[0]["epoch"] == 0 and epoch == 1:
        write_metrics(run.output / METRICS_FILE, run.history)  # the epoch-0 line waits for a checkpoint to resume
    else:
        append_metrics(run.output / METRICS_FILE, record)
    if run.draw_curves:
        plot_curves(run.output / CURVES_FILE, run.history, title=title, held_out=run.held_out)


def run_recipe(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run a recipe's ``main``; a :class:`ShareError` or OS error becomes one ``error:`` line and exit 2.

    With ``SHARETX_DEBUG=1`` in the environment the line follows the error's full traceback. Any other
    exception is a bug and propagates with its traceback, as Python prints it.

    Use as ``sys.exit(run_recipe(main, get_args_parser().parse_args()))``.
    """
    try:
        main(args)
    except (ShareError, OSError) as e:
        if debug_requested():
            traceback.print_exception(e, file=sys.stderr)
        print_error(str(e))
        return 2
    except RuntimeError as e:
        if _WORKER_DEATH.search(str(e)) is None:
            raise
        # torch's SIGCHLD handler, raised outside fit's handling (in the instant before it sets the handler aside).
        with _sigchld_held():
            output = getattr(args, "output", None)
            where = _last_checkpoint(Path(output)) if output is not None else "continue with --resume"
            print_error(f"{_worker_death(e, [])}; {where}")
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    finally:
        sys.stdout.flush()
        cleanup()
    return 0
