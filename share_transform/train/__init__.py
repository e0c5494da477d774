"""The training engine behind ``recipes/train_imagenet.py`` and ``recipes/train_cifar.py``.

Dataset-agnostic: a recipe brings a model (built, initialised, shared), two datasets returning
``(image, target)``, a device-side ``preprocess`` and the protocol; the engine does the rest, the same
way for both recipes (torchvision references' ``train.py`` + ``utils.py`` split).

Entry points, in the order a recipe's ``main`` uses them:

* :func:`add_training_args` / :func:`resolve_args` (``args``): the shared flags and their defaults;
* :func:`world_from_env`, :func:`per_rank_batch`, :func:`init_distributed` (``distributed``,
  ``trainer``): torchrun/DDP set-up, NCCL on GPUs, gloo on CPUs; :func:`print0` prints on rank 0 only;
* :func:`check_output`: fail fast, before any work, on an output directory the run cannot use;
  :func:`locked_output`: hold the run directory's lock (rank 0) around every write into it;
* :func:`setup_runtime`, :func:`seed_all`: deterministic kernels or cuDNN autotuning + TF32;
* :func:`init_weights` (:mod:`share_transform.init`, re-exported): fb.resnet.torch ("fan_out") or WRN
  ("fan_in") initialisation, before ``share_transform.apply``;
* :func:`make_loader`, :func:`set_epoch` (``data``): sharded loaders whose order and augmentation depend on
  ``(seed, epoch)`` only; :class:`SyntheticDataset` for ``--synthetic``;
* :class:`Normalize` (``loop``): the device-side uint8 -> normalised float transform;
* :func:`fit` (``trainer``): epochs of :func:`train_one_epoch` + :func:`evaluate` (``loop``) with SGD
  Nesterov on the de-duplicated parameters and step decay (``optim``), checkpoints (``checkpoint``),
  ``run.json``, ``metrics.jsonl``, ``curves.png`` (``metrics``) and resume;
* :func:`run_recipe`: turns a :class:`share_transform.ShareError` into one ``error:`` line, exit 2.

:mod:`.imagenet` holds the ImageNet datasets and fb.resnet.torch augmentation.
"""

from ..init import init_weights
from .args import add_training_args, resolve_args
from .checkpoint import load_run_checkpoint, save_checkpoint, state_path, weights_path
from .data.sampling import SyntheticDataset, make_loader, set_epoch
from .distributed import DistInfo, init_distributed, print0, world_from_env
from .errors import ConfigError, DataError, NonFiniteLossError
from .loop import EpochStats, Normalize, evaluate, train_one_epoch, train_step
from .metrics import METRIC_KEYS, curves_title, plot_curves, read_metrics
from .optim import build_optimizer, build_scheduler, scaled_lr, unique_parameters
from .trainer import (
    TrainConfig,
    build_recipe_model,
    check_output,
    fit,
    is_shared,
    locked_output,
    per_rank_batch,
    run_info,
    run_recipe,
    seed_all,
    setup_runtime,
)

__all__ = [
    "METRIC_KEYS",
    "ConfigError",
    "DataError",
    "DistInfo",
    "EpochStats",
    "NonFiniteLossError",
    "Normalize",
    "SyntheticDataset",
    "TrainConfig",
    "build_recipe_model",
    "run_info",
    "add_training_args",
    "build_optimizer",
    "build_scheduler",
    "check_output",
    "curves_title",
    "evaluate",
    "fit",
    "init_distributed",
    "init_weights",
    "is_shared",
    "load_run_checkpoint",
    "locked_output",
    "make_loader",
    "per_rank_batch",
    "plot_curves",
    "print0",
    "read_metrics",
    "resolve_args",
    "run_recipe",
    "save_checkpoint",
    "scaled_lr",
    "seed_all",
    "set_epoch",
    "setup_runtime",
    "state_path",
    "train_one_epoch",
    "train_step",
    "unique_parameters",
    "weights_path",
    "world_from_env",
]
