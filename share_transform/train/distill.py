"""Compressing a trained model: the trained original a run starts from, and knowledge distillation from it.

The *trained original* is ``--arch`` with trained weights, unshared: timm's pretrained weights
(``--pretrained``, from the hub or, offline, a file through timm's own ``pretrained_cfg_overlay=dict(file=...)``)
or a checkpoint (``--from-checkpoint``: a safetensors or ``.pth`` file, timm ``train.py``'s ``.pth.tar``, or a run
directory of these recipes). The shared model (the *student*) starts from its weights, shared with a warm start
(``--init mean | mean-scaled | svd``), and with ``--distill`` learns from its outputs (the original is then the
*teacher*). :func:`load_original` reads it and records where it came from and a SHA-256 of its weights, so that
``--resume`` rebuilds it from the same source and refuses another.

The distillation loss (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015), with
student logits ``z_s``, teacher logits ``z_t``, temperature ``T`` and weight ``alpha``:

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

the KL divergence summed over classes and averaged over the batch. ``T^2`` keeps the soft term's gradients at
the scale of the hard term's as ``T`` changes (Hinton et al., section 2). Defaults ``T = 4``, ``alpha = 0.9``:
:data:`share_transform.train.args.KD_TEMPERATURE`, :data:`~share_transform.train.args.KD_ALPHA`.

The teacher stays in eval mode and runs under ``torch.no_grad()``; it is no parameter of the student, so it is in
no optimizer group, no checkpoint and no DDP wrapper (each rank holds its own copy).

Example:
    >>> original = load_original(args, num_classes=1000)       # None without --pretrained / --from-checkpoint
    >>> model, params, unique = build_recipe_model(args, 1000, original=original.model)
    >>> fit(model, ..., distill=Distillation(original.model, temperature=4.0, alpha=0.9))
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..build import build_model, split_name
from ..checkpoints import load_weights, read_checkpoint
from ..errors import CheckpointError, MissingFileError
from ..files import is_safetensors, read_info
from ..tie import count_parameters
from .args import WARM_STARTS
from .errors import ConfigError

__all__ = ["Distillation", "Original", "file_sha256", "kd_loss", "load_original", "summary", "weights_sha256"]

#: The checkpoints of a run directory, in the order ``--from-checkpoint RUN`` takes them.
RUN_CHECKPOINTS = ("best", "last")


def kd_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(logits, targets)``, ``p = softmax(logits / T)``.

    The KL divergence is summed over classes and averaged over the batch (``reduction="batchmean"``), computed in
    float32 from log-probabilities on both sides (no ``log(0)`` when a teacher probability underflows).
    """
    t = float(temperature)
    student, teacher = logits.float(), teacher_logits.float()
    kl = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean", log_target=True
    )
    return alpha * t * t * kl + (1.0 - alpha) * F.cross_entropy(student, targets)


@dataclass(frozen=True)
class Distillation:
    """What ``fit`` needs to distil: the teacher (unshared, trained; eval mode, no gradients) and the loss's
    temperature and weight (see :func:`kd_loss`)."""

    teacher: nn.Module
    temperature: float
    alpha: float

    def __post_init__(self) -> None:
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits, teacher_logits, targets, temperature=self.temperature, alpha=self.alpha)


@dataclass(frozen=True)
class Original:
    """A trained original: ``model`` (``--arch``, unshared, in eval mode, no gradients) and ``record``, what
    ``run.json`` keeps of it (``source``: ``"pretrained"`` or ``"checkpoint"``; the file read and its SHA-256
    where there is one; ``weights_sha256``, the hash a resume compares)."""

    model: nn.Module
    record: dict[str, Any]

    @property
    def params(self) -> int:
        return count_parameters(self.model)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state: every entry's name, dtype, shape and bytes, in name order. Equal for equal
    weights whatever file or download they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe(record: dict[str, Any] | None) -> str:
    """A trained original's record in words: ``timm's pretrained resnet50 (a1_in1k)``, ``checkpoint FILE``."""
    if not record:
        return "no trained original"
    if record.get("source") == "pretrained":
        where = f", read from {record['file']}" if record.get("file") else ""
        tag = f" ({record['tag']})" if record.get("tag") else ""
        return f"timm's pretrained {record.get('arch')}{tag}{where}"
    return f"checkpoint {record.get('file')}"


def summary(args: argparse.Namespace, original: Original | None) -> str | None:
    """The line a recipe prints about its trained original: where it comes from, how the model starts from it,
    and the distillation; None without one."""
    if original is None:
        return None
    warm = args.init in WARM_STARTS
    start = f"warm start --init {args.init}" if warm else f"the model from scratch (--init {args.init})"
    kd = f"; distilling at T={args.kd_temperature:g}, alpha={args.kd_alpha:g}" if args.distill else ""
    return (
        f"trained original: {describe(original.record)}, {original.params:,} parameters, weights sha256 "
        f"{original.record['weights_sha256'][:12]}; {start}{kd}"
    )


def load_original(args: argparse.Namespace, num_classes: int) -> Original | None:
    """The trained original the run names (``--pretrained`` or ``--from-checkpoint``), or None.

    It is ``--arch`` with ``--model-kwargs`` and ``num_classes`` classes, built by
    :func:`share_transform.build_model`, and the trained weights copied in only when every name and shape fits.

    Raises:
        MissingFileError: the checkpoint, or a run directory's checkpoint, does not exist.
        CheckpointError: the weights are of another architecture or class count (a ShaResNet file's build record
            names another ``--arch``, or the tensors do not fit), or timm cannot load its file.
        ConfigError: ``--pretrained`` for a network timm has no weights for, a torchvision network, or weights
            that predict another number of classes than the data have (a teacher must predict the run's classes).
        share_transform.FileFormatError: the checkpoint is not a readable safetensors or ``torch.save`` file.
    """
    if getattr(args, "pretrained", False):
        return _pretrained(args, num_classes)
    path = getattr(args, "from_checkpoint", None)
    if path is not None:
        return _from_checkpoint(Path(path), args, num_classes)
    return None


def _finish(model: nn.Module, record: dict[str, Any]) -> Original:
    model.eval()
    model.requires_grad_(False)
    return Original(model, {**record, "weights_sha256": weights_sha256(model)})


def _checkpoint_file(path: Path) -> Path:
    """``path``, or the weights of a run directory (its ``checkpoint-best``, else ``checkpoint-last``)."""
    if path.is_dir():
        for tag in RUN_CHECKPOINTS:
            file = path / f"checkpoint-{tag}.safetensors"
            if file.is_file():
                return file
        raise MissingFileError(
            f"--from-checkpoint {path} is a directory but holds no checkpoint-best.safetensors or "
            "checkpoint-last.safetensors: give a run directory of these recipes, or a weights file"
        )
    if not path.is_file():
        raise MissingFileError(f"--from-checkpoint {path} does not exist")
    return path


def _check_recorded_arch(file: Path, arch: str) -> None:
    """A ShaResNet file records the architecture it holds: refuse another ``--arch`` by name, before loading."""
    if not is_safetensors(file):
        return
    build = read_info(file).build
    if build is None:
        return
    source, name = split_name(arch)
    if (build.get("source"), build.get("name")) != (source, name):
        held = build["name"] if build.get("source") == "timm" else f"{build.get('source')}:{build.get('name')}"
        raise CheckpointError(
            f"--from-checkpoint {file} holds a {held} (its build record), but this run trains --arch {arch}; "
            f"give --arch {held} or a checkpoint of {arch}"
        )


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], where: str, args: argparse.Namespace) -> None:
    try:
        load_weights(model, state, source=where)
    except CheckpointError as e:
        detail = str(e).split(". Was it saved", 1)[0]
        raise CheckpointError(
            f"{detail}. It is no trained --arch {args.arch} for these data: give the --arch and --model-kwargs it "
            "was trained with (and data of its classes)"
        ) from None


def _from_checkpoint(path: Path, args: argparse.Namespace, num_classes: int) -> Original:
    file = _checkpoint_file(path)
    _check_recorded_arch(file, args.arch)
    model = build_model(args.arch, num_classes=num_classes, **args.model_kwargs)
    _load_into(model, read_checkpoint(file), f"--from-checkpoint {file}", args)
    record = {"source": "checkpoint", "arch": args.arch, "path": str(path), "file": str(file)}
    return _finish(model, {**record, "file_sha256": file_sha256(file)})


def _pretrained(args: argparse.Namespace, num_classes: int) -> Original:
    import timm
    from timm.models import get_pretrained_cfg

    source, name = split_name(args.arch)
    if source != "timm":
        raise ConfigError(
            f"--pretrained reads timm's weights, and --arch {args.arch} is torchvision's: save its weights "
            "(torch.save(model.state_dict(), FILE)) and give --from-checkpoint FILE"
        )
    model = build_model(args.arch, num_classes=num_classes, **args.model_kwargs)  # checks the name and kwargs
    cfg = get_pretrained_cfg(name)
    path = args.pretrained_path
    if path is None:
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ConfigError(
                f"--pretrained: timm has no pretrained weights for {name}; give --pretrained-path FILE or "
                "--from-checkpoint FILE"
            )
        if cfg.num_classes != num_classes:
            raise ConfigError(
                f"--pretrained: timm's {name}.{cfg.tag} predicts {cfg.num_classes} classes and the data have "
                f"{num_classes}; a trained original must predict the run's classes (train it on these data first, "
                "then give --from-checkpoint RUN)"
            )
        overlay: dict[str, Any] = {}
    else:
        if not Path(path).is_file():
            raise MissingFileError(f"--pretrained-path {path} does not exist")
        # The file stands for the pretrained weights of a model with the data's classes: timm loads it strictly.
        overlay = {"file": str(path), "num_classes": num_classes}
    try:
        loaded = timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **args.model_kwargs
        )
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"--pretrained: timm could not load the weights of {name}{_from(path)}: {first}"
        ) from None
    _load_into(model, loaded.state_dict(), f"--pretrained {name}{_from(path)}", args)
    record: dict[str, Any] = {
        "source": "pretrained",
        "arch": args.arch,
        "tag": None if path is not None or cfg is None else cfg.tag,
        "hub": None if path is not None or cfg is None else (cfg.hf_hub_id or cfg.url),
        "file": None if path is None else str(path),
        "file_sha256": None if path is None else file_sha256(path),
    }
    return _finish(model, record)


def _from(path: Path | None) -> str:
    return "" if path is None else f" (--pretrained-path {path})"
