"""``fit``: the epoch loop both recipes run, with the run-directory contract; and ``run_recipe``.

Run directory (``--output``), written by rank 0 only:

* ``run.json`` at the start of a run (``--resume`` checks it is the same run, then rewrites it):
  ``recipe``, ``arch``, ``dataset``, ``share``, ``policy``, ``sharing`` (``group_size``, ``scope``,
  ``templates``, ``budget`` as given; None for an unshared run),
  ``seed``, ``epochs``, ``batch_size``, ``lr`` (the optimizer's initial lr, after batch scaling),
  ``params_unshared``, ``unique_params``, ``args`` (every CLI argument);
* ``metrics.jsonl``, one line per finished epoch, and ``curves.png`` (see :mod:`.metrics`);
* ``checkpoint-last.*`` after every epoch and ``checkpoint-best.*`` at the best test top-1 error
  (see :mod:`.checkpoint`).

A fresh run refuses a directory that already holds a checkpoint (``--resume`` continues it), so
nothing written is ever overwritten by accident. On a non-finite loss ``fit`` stops before writing
anything from the bad epoch and says which step and which checkpoint is the last good one.

Example (what a recipe's ``main`` does):
    >>> info = init_distributed(args.device)
    >>> setup_runtime(deterministic=args.deterministic)
    >>> fit(model, train_loader, val_loader, config=TrainConfig(...), dist_info=info, output=args.output,
    ...     resume=args.resume, run_info=run_info, train_preprocess=norm, eval_preprocess=norm)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
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
from ..figure import require_matplotlib
from ..init import init_weights
from ..tie import PLAIN_ATTR, alias_groups, apply, count_parameters, get_plan, keep_ties
from .args import SHARING_FLAGS, sharing_options
from .checkpoint import (
    check_training_state,
    has_checkpoint,
    load_run_checkpoint,
    repair_checkpoints,
    save_checkpoint,
    state_path,
    weights_path,
)
from .data.sampling import sample_seed, set_epoch
from .distributed import DistInfo, barrier, broadcast_buffers, cleanup, print0, print_error, share_verdict
from .errors import ConfigError, NonFiniteLossError
from .lock import check_unlocked, run_lock
from .loop import EpochStats, Preprocess, evaluate, train_one_epoch
from .metrics import (
    CURVES_FILE,
    METRICS_FILE,
    RUN_FILE,
    ProgressBar,
    append_metrics,
    plot_curves,
    write_metrics,
    write_text,
)
from .optim import build_optimizer, build_scheduler, scaled_lr


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation protocol and the speed options of a run.

    ``lr`` is the optimizer's learning rate for the global batch (scale a per-256 figure with
    :func:`share_transform.train.optim.scaled_lr` first); ``milestones`` are 0-based epochs after
    which the lr is multiplied by ``gamma``.
    """

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    milestones: Sequence[int]
    gamma: float
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 20

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
        )


def build_recipe_model(
    args: argparse.Namespace, num_classes: int, *, input_size: tuple[int, int, int] | None = None
) -> tuple[nn.Module, int, int]:
    """Build ``--arch`` with the recipe's init, share it when ``--share``; also the unshared and unique counts.

    Raises:
        ConfigError: ``--no-share`` with a network shared by construction (``sharesnet18``).
        PlanMismatchError: ``--share`` with options other than those a network shared by construction has.
    """
    model = build_model(args.arch, num_classes=num_classes, **args.model_kwargs)
    built = get_plan(model)  # a network shared by construction: its plan counts it before sharing
    if built is not None and not args.share:
        raise ConfigError(
            f"--arch {args.arch} is shared by construction (policy {built.policy}); for an unshared run use "
            f"--arch {getattr(model, PLAIN_ATTR, 'the network it shares')}"
        )
    init_weights(model, args.init)
    params_unshared = built.params_before if built is not None else count_parameters(model)
    options = sharing_options(args)
    if options is not None:
        apply(model, args.policy, input_size=input_size, options=options)
    return model, params_unshared, count_parameters(model)


def run_info(
    args: argparse.Namespace,
    *,
    recipe: str,
    dataset: str,
    config: TrainConfig,
    params_unshared: int,
    unique_params: int,
    **extra: Any,
) -> dict[str, Any]:
    """The ``run.json`` record both recipes write (the report reads it)."""
    return {
        "recipe": recipe,
        "arch": args.arch,
        "dataset": dataset,
        "share": args.share,
        "policy": args.policy if args.share else None,
        "sharing": options.to_dict() if (options := sharing_options(args)) is not None else None,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": config.lr,
        "params_unshared": params_unshared,
        "unique_params": unique_params,
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
#: so a new value would be recorded in run.json but not used. ``--epochs`` may change (grow) on resume.
PROTOCOL_FLAGS = ("lr", "momentum", "weight_decay", "lr_milestones", "lr_gamma")
#: Why a resume refuses a changed flag: the checkpoint's optimizer and schedule carry the optimisation flags,
#: and its tensors are the model the sharing flags built.
#: The flags that made the run's model and data stream (``img_size`` is the ImageNet recipe's).
RUN_FLAGS = ("seed", "img_size", "init", "policy", "model_kwargs")
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
        CheckpointError: ``resume`` with another value of an optimisation or sharing flag, or of
            :data:`RUN_FLAGS`, than the run's; a ``run.json`` that is not a JSON object.
        ConfigError: matplotlib, needed for ``curves.png``, is missing.
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
    require_matplotlib()  # curves.png is part of the output contract


def _read_run_json(output: Path) -> dict[str, Any]:
    """The run's ``run.json`` (empty when there is none); a tampered one is a :class:`CheckpointError`."""
    path = output / RUN_FILE
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--resume: {path} is not valid JSON ({e}); it was not written by a run") from None
    if not isinstance(run, dict) or not isinstance(run.get("args", {}), dict):
        raise CheckpointError(f"--resume: {path} is not a run record (a JSON object with an args object)")
    return run


def _check_same_protocol(output: Path, args: dict[str, Any]) -> None:
    before = _read_run_json(output).get("args", {})
    for key, reason in _RESUME_REASONS.items():
        if key in before and key in args and before[key] != args[key]:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"--resume: {output} was trained with {flag} {_flag_text(before[key])}, this command gives "
                f"{flag} {_flag_text(args[key])}; {reason}, so resume "
                f"with the same {flag} or start a new run in another --output"
            )


def _flag_text(value: Any) -> str:
    """A flag's value as typed on the command line (``--lr-milestones 30 60``)."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def write_run_json(output: Path, run_info: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (paths and other non-JSON values become strings)."""
    write_text(output / RUN_FILE, json.dumps(run_info, indent=2, default=str) + "\n")


def _check_same_run(output: Path, run_info: dict[str, Any]) -> None:
    before = _read_run_json(output)
    for key in ("arch", "share", "policy", "dataset", "batch_size"):
        if key in before and before[key] != run_info.get(key):
            raise CheckpointError(
                f"--resume: {output} was started with {key}={before[key]!r}, this command gives "
                f"{run_info.get(key)!r}; resume with the same settings or choose another --output"
            )


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
) -> list[dict[str, Any]]:
    """Train ``model`` for ``config.epochs`` epochs (from the last checkpoint with ``resume``).

    Args:
        model: built, initialised and shared on the CPU; ``fit`` moves it to the device (keeping its
            ties), wraps it in DDP when the world size is above 1 and compiles it on request.
        train_loader, val_loader: from :func:`share_transform.train.data.sampling.make_loader`.
        config: the optimisation protocol.
        dist_info: from :func:`init_distributed`.
        output: the run directory.
        resume: continue from ``output``'s ``checkpoint-last``.
        run_info: the ``run.json`` record (checked against the old one on resume, then rewritten).
        train_preprocess, eval_preprocess: device-side input transforms.
        title: heading of ``curves.png``.

    Returns:
        The metrics history, one record per epoch (also in ``metrics.jsonl``).

    Raises:
        OutputExistsError, MissingFileError: see :func:`check_output`.
        CheckpointError: an unreadable checkpoint, or ``resume`` with other settings than the run's (arch,
            share, policy, dataset, batch size, or a :data:`PROTOCOL_FLAGS` value; ``epochs`` may grow).
        NonFiniteLossError: the loss became NaN/inf; nothing from that epoch was written.
    """
    output = Path(output)
    with locked_output(output, resume=resume, dist_info=dist_info, args=run_info.get("args")):
        run = _start_run(model, config, dist_info, output, run_info=run_info, steps=len(train_loader))
        if resume:
            _resume(run, run_info)
        if dist_info.is_main:
            write_run_json(run.output, run_info)  # on resume too: --epochs may have grown
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
    return run.history


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
) -> _Run:
    """Move the model to the device, ties kept; build the optimizer; wrap."""
    device = dist_info.device
    ties = alias_groups(model)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    keep_ties(model, ties, f"moving the model to {device}")
    optimizer = build_optimizer(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, milestones=config.milestones, gamma=config.gamma)
    train_model: nn.Module = model
    if dist_info.distributed:
        # DDP registers each shared weight once (it de-duplicates parameters) and broadcasts rank 0's copy.
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
        keep_ties(model, ties, "DistributedDataParallel")
    if config.compile:
        train_model = cast(nn.Module, torch.compile(train_model))
    shared = bool(run_info.get("share", False))
    return _Run(model, train_model, optimizer, scheduler, config, dist_info, output, steps, shared)


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
        repair_checkpoints(run.output, run.model, state)
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
        )
    except NonFiniteLossError as e:
        last = (
            f"the last good checkpoint is {weights_path(run.output, 'last')} (epoch {epoch})"
            if epoch > 0 and has_checkpoint(run.output, "last")
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(f"{e}; {last}", epoch=e.epoch, step=e.step) from None


def _evaluate_epoch(run: _Run, val_loader: DataLoader, preprocess: Preprocess | None) -> EpochStats:
    """Make every rank's BatchNorm statistics rank 0's, test, and step the schedule."""
    broadcast_buffers(run.model)
    val = evaluate(run.model, val_loader, device=run.dist_info.device, preprocess=preprocess, amp=run.config.amp)
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
    }
    # Checkpoint before the metrics line: a kill in between is repaired from the history on resume. Last before
    # best: a kill between them leaves the best epoch in last, which the resume copies to best.
    for tag in ("last", "best") if is_best else ("last",):
        save_checkpoint(run.output, tag, run.model, state)
        print0(f"saved {weights_path(run.output, tag).name} (epoch {epoch})")
    append_metrics(run.output / METRICS_FILE, record)
    plot_curves(run.output / CURVES_FILE, run.history, title=title)


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
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    finally:
        sys.stdout.flush()
        cleanup()
    return 0
